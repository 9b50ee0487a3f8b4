"""On a GPU: packed rows through torch's variable-length flash attention (one call a layer for
every example of the batch) train as through one SDPA call per example, and how long each takes.

Both paths run the same packed alpaca_en_demo rows through the same model in bf16, forward and
backward; the report gives the largest relative difference of the loss and of the gradients'
norms per parameter (bf16 noise is about 1e-2) and the median step time of each. It fails when
the variable-length path was not taken (no flash attention on this GPU) or the two disagree.

Run: python benchmarks/gpu/packed_attention.py --model FOLDER   (LLAMA_TUNE_DATA: the data)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llama_tune import attention, data
from llama_tune.schema import DataConfig, SplitsConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
"""A CPU runs the script's dry run: the per-example path twice, no varlen."""
TOLERANCE = 3e-2
"""Relative difference allowed between the paths: two bf16 computations of the same sums."""


def packed_batch(model_folder: Path, rows: int) -> dict[str, torch.Tensor]:
    """`rows` alpaca_en_demo examples in the model's chat template, laid end to end."""
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    source = Path(os.environ.get("LLAMA_TUNE_DATA", "../shared/datasets"))
    config = DataConfig(
        source=str(source / "instruction" / "alpaca_en_demo"),
        task="instruction",
        max_length=1024,
        max_train_rows=rows,
        splits=SplitsConfig(validation=None, test=None),
    )
    examples = data.build(config, tokenizer).train.examples
    return {name: value.to(DEVICE) for name, value in data.collate_packed(examples).items()}


def step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, list[float]]:
    """One forward and backward: the loss and each parameter's gradient norm."""
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.item(), [param.grad.float().norm().item() for param in model.parameters()]


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, list, float]:
    loss, norms = step(model, batch)
    seconds = []
    for _ in range(5):
        synchronize()
        started = time.perf_counter()
        step(model, batch)
        synchronize()
        seconds.append(time.perf_counter() - started)
    return loss, norms, statistics.median(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=32)
    args = parser.parse_args()
    batch = packed_batch(args.model, args.rows)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to(DEVICE)
    model.config.use_cache = False
    attention.use_training_attention(model, packed=True)
    varlen_dtype, calls = attention._varlen_dtype, []
    attention._varlen_dtype = lambda *_: None
    loop_loss, loop_norms, loop_seconds = timed(model, batch)
    attention._varlen_dtype = varlen_dtype
    if attention.varlen_attn is not None:
        varlen = attention.varlen_attn
        attention.varlen_attn = lambda *arguments, **options: (
            calls.append(1) or varlen(*arguments, **options)
        )
    varlen_loss, varlen_norms, varlen_seconds = timed(model, batch)
    taken = bool(calls)
    differences = [abs(varlen_loss - loop_loss) / abs(loop_loss)] + [
        abs(new - old) / max(old, 1e-6) for new, old in zip(varlen_norms, loop_norms, strict=True)
    ]
    print(f"{batch['input_ids'].shape[1]} packed tokens of {args.rows} examples, bf16")
    print(f"one SDPA call per example: loss {loop_loss:.5f}, {loop_seconds * 1000:.1f} ms a step")
    print(f"varlen flash attention:    loss {varlen_loss:.5f}, {varlen_seconds * 1000:.1f} ms")
    print(
        f"varlen taken: {taken} ({len(calls)} calls); speed-up "
        f"{loop_seconds / varlen_seconds:.2f}x; largest relative difference "
        f"{max(differences):.2e} (tolerance {TOLERANCE})"
    )
    return 0 if (taken or DEVICE == "cpu") and max(differences) <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
