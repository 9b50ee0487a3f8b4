"""What a run executes on: the compute precision to use here, and the library versions that
shape its numbers (recorded in every summary and evaluation)."""

from __future__ import annotations

import platform
from pathlib import Path

import accelerate
import peft
import torch
import transformers

from llama_tune.errors import UserError


def resolve_precision(precision: str) -> str:
    """Accelerate's mixed-precision name for the recipe's precision; `auto` picks the fastest."""
    if precision == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if _cpu_has_fast_bf16() else "no"
    if precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.precision: fp16 needs a CUDA GPU; use bf16 or auto on a CPU")
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape the numbers of a run."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }
