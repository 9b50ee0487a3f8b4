"""What a run executes on: the compute precision to use here, and the library versions that
shape its numbers (recorded in every summary and evaluation)."""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import sys
import time
from datetime import timedelta
from pathlib import Path

import accelerate
import peft
import torch
import transformers
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from llama_tune import allocator
from llama_tune.errors import UserError


def resolve_precision(precision: str) -> str:
    """Accelerate's mixed-precision name for the recipe's precision; `auto` picks the fastest."""
    if precision == "auto":
        if torch.cuda.is_available():
            # Native bf16 only (Ampere on): torch's default also counts GPUs that merely store
            # bf16 (a V100, a T4), whose fp16 tensor cores are far faster; and its probe
            # tensor would open a context on GPU 0 in every process.
            native = torch.cuda.is_bf16_supported(including_emulation=False)
            return "bf16" if native else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "no"
    if precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.precision: fp16 needs a CUDA GPU; use bf16 or auto on a CPU")
    if precision == "bf16" and not torch.cuda.is_available() and not cpu_has_native_bf16():
        _say_bf16_is_slow()
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


@functools.cache
def _say_bf16_is_slow() -> None:
    # Without these instructions PyTorch emulates bf16 products: 1.4 GFLOP/s against 110 in
    # fp32 on a 2-core AMD EPYC (AVX2 only), so a bf16 run takes many times longer.
    print(
        "note: train.precision is bf16, but this CPU has no native bf16 (AVX512-BF16 or AMX): "
        "expect it to run many times slower than fp32 (train.precision: auto picks fp32 here)",
        file=sys.stderr,
    )


def cpu_processes() -> bool:
    """Several launched processes (torchrun, `accelerate launch`) on a machine without a GPU.

    Accelerate joins such processes into one run (gloo) only when told they are on the CPU;
    otherwise each would train alone, all writing the same run folder. Every Accelerator and
    process state of a run is made with this flag, since the first one made fixes it.
    """
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


class LaunchError(UserError):
    """A launch this run cannot honour (its config, or more processes than GPUs)."""


def fsdp_requested() -> bool:
    """Whether the launch asks for FSDP (`accelerate launch --config_file configs/fsdp.yaml`
    sets ACCELERATE_USE_FSDP): llama-tune then shards the model itself (`sharding`)."""
    return parse_flag_from_env("ACCELERATE_USE_FSDP")


def deepspeed_requested() -> bool:
    """Whether the launch asks for DeepSpeed (`configs/deepspeed_zero2.yaml` and zero3 set
    ACCELERATE_USE_DEEPSPEED): llama-tune then trains through its ZeRO engine (`zero`)."""
    return parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")


def check_launch() -> None:
    """Stop, before any model loads, on a launch this run cannot honour: DeepSpeed not
    installed, FSDP other than FSDP2 or with options llama-tune does not apply, FSDP on one
    process, or more processes on this machine than it has GPUs (torch would fail on a
    missing device, deep in a traceback)."""
    if deepspeed_requested() and importlib.util.find_spec("deepspeed") is None:
        raise LaunchError(
            "the launch config asks for DeepSpeed, which is not installed: "
            "pip install --no-build-isolation 'deepspeed==0.19.8' (see README, Scaling out)"
        )
    if fsdp_requested():
        _check_fsdp_launch()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and local > gpus:
        raise LaunchError(
            f"{local} processes launched on this machine, which has {gpus} GPU(s): "
            f"launch at most {gpus} (--num_processes, --nproc_per_node)"
        )


FSDP_OPTIONS_NOT_APPLIED = {
    "FSDP_OFFLOAD_PARAMS": "fsdp_offload_params",
    "FSDP_ACTIVATION_CHECKPOINTING": "fsdp_activation_checkpointing (use the recipe's "
    "model.gradient_checkpointing)",
}
"""FSDP launch options that llama-tune's sharding does not apply: refused rather than ignored."""


def _check_fsdp_launch() -> None:
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise LaunchError(
            f"the launch config asks for FSDP version {version}; llama-tune shards with FSDP2: "
            "set fsdp_version: 2 (see configs/fsdp.yaml)"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise LaunchError(
            "the launch config asks for FSDP, which shards the model over several processes, "
            "but this run has one: launch several (--num_processes), or use "
            "configs/single_gpu.yaml"
        )
    for variable, option in FSDP_OPTIONS_NOT_APPLIED.items():
        if parse_flag_from_env(variable):
            raise LaunchError(
                f"the launch config sets {option}, which llama-tune's FSDP does not apply yet: "
                "remove it (configs/fsdp.yaml)"
            )


PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)
"""How long a collective waits for every process, NCCL's 10 minutes raised: the others wait in
one while the main process writes a checkpoint (a full fine-tune's fp32 moments are 64 GB for
an 8B model: minutes on a network disk) or builds its share of a teacher cache."""


def process_state() -> PartialState:
    """This process's place in the run (rank, count, device), once the launch is checked."""
    check_launch()
    return PartialState(cpu=cpu_processes(), timeout=PROCESS_GROUP_TIMEOUT)


def end_processes() -> None:
    """End the process group of a launched run, once nothing more is shared over it: every
    process first waits for the others (the main one may still be writing the run's files),
    so that none tears the group down while another is still inside the run."""
    state = process_state()
    state.wait_for_everyone()
    state.destroy_process_group()


def model_device() -> torch.device:
    """Where this process creates its models: its own accelerator (`cuda:LOCAL_RANK` under a
    launcher, the GPU of a plain run, else the CPU), so that no full copy is built on the CPU
    first."""
    return process_state().device


def holds_weights(model: torch.nn.Module) -> bool:
    """Whether `model`'s parameters hold values: not one made on the meta device, waiting for
    the main process to send its weights (`sharding`)."""
    return not any(param.is_meta for param in model.parameters())


def device_name(device: torch.device) -> str:
    """The device a run computes on, as its summary records it (`cuda:0 (NVIDIA H200)`)."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """The most accelerator memory this process's tensors held so far, in GiB; None on the CPU,
    where torch keeps no such count."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def compute_dtype(inputs: torch.Tensor) -> torch.dtype:
    """The dtype an autocast-listed op (a linear layer, SDPA) computes `inputs` in: autocast's
    where it is on for their device, else their own."""
    device = inputs.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return inputs.dtype


BF16_MIN_SPEEDUP = 1.25
"""How much faster than fp32 a CPU's bf16 products must run for `auto` to train in bf16."""


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether bf16 matrix products beat fp32 ones on this CPU, by `BF16_MIN_SPEEDUP`. Native
    bf16 instructions are needed (AVX512-BF16 or AMX; without, PyTorch's bf16 products run
    about 80x slower than fp32 ones), and are not enough: a 2-core Xeon that reports
    AVX512-BF16 but no AMX multiplied bf16 at 168 GFLOP/s against 316 in fp32, and trained
    SST-2 about 0.7x as fast in bf16. So the rates are measured (a fifth of a second or less),
    once per process; the processes of a launched CPU run take the main process's answer."""
    if cpu_processes():
        answer = [_bf16_beats_fp32() if process_state().is_main_process else None]
        torch.distributed.broadcast_object_list(answer, src=0)
        return bool(answer[0])
    return _bf16_beats_fp32()


def _bf16_beats_fp32() -> bool:
    if not cpu_has_native_bf16():
        return False
    fp32_seconds, bf16_seconds = _product_seconds()
    return fp32_seconds >= BF16_MIN_SPEEDUP * bf16_seconds


def cpu_has_native_bf16() -> bool:
    """Whether the CPU has bf16 instructions (AVX512-BF16 or AMX), as Linux reports them;
    without, PyTorch emulates bf16 products."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _product_seconds(rounds: int = 6) -> tuple[float, float]:
    """The best time of a [512 x 1024] by [1024 x 1024] product in fp32 and in bf16, the two
    measured in turn so that the machine's load weighs on both alike."""
    generator = torch.Generator().manual_seed(0)
    fp32 = [
        torch.randn(512, 1024, generator=generator),
        torch.randn(1024, 1024, generator=generator),
    ]
    operands = {torch.float32: fp32, torch.bfloat16: [tensor.bfloat16() for tensor in fp32]}
    best = dict.fromkeys(operands, float("inf"))
    for _ in range(rounds):
        for dtype, (left, right) in operands.items():
            started = time.perf_counter()
            torch.mm(left, right)
            best[dtype] = min(best[dtype], time.perf_counter() - started)
    return best[torch.float32], best[torch.bfloat16]


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape the numbers of a run, and the malloc it
    runs on (allocator.py)."""
    return {
        "python": platform.python_version(),
        "malloc": allocator.loaded_allocator(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }
