"""Fused LoRA layers against peft's forward: one model's forward and backward, paired in one
process.

Two copies of the same LoRA model (r=8 on every linear layer), one with llama-tune's fused
layers (`lora_fusion`), train on the same random rows in alternating blocks of steps, so that
the machine's drift falls on both alike. A step is the decoder's forward and backward to a
loss on the last two positions (the output head, the same in both, is left out). Reports each
block's seconds a step, the medians and their ratio, and the largest gradient difference.

Run: python benchmarks/lora_fusion.py [--rows 8 --length 48] [--precision bf16]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from llama_tune import lora_fusion, models
from model_flops import slow_bf16_here

REPO = Path(__file__).resolve().parent.parent
SYSTEMS = ("peft", "fused")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="built-in, folder or id")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=48, help="tokens a row")
    parser.add_argument("--blocks", type=int, default=5, help="blocks of each, alternating")
    parser.add_argument("--steps", type=int, default=3, help="timed steps a block, after one")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results"))
    return parser.parse_args()


def _models(name: str, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(models.resolve(name), dtype=dtype)
    adapted = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    for param_name, param in adapted.named_parameters():
        if "lora_B" in param_name:  # as after training: both factors non-zero
            torch.nn.init.normal_(param, std=0.02)
    models.skip_adapter_input_casts(adapted)
    fused = copy.deepcopy(adapted)
    lora_fusion.fuse_lora_layers(fused)
    return {"peft": adapted, "fused": fused}


def _step(model: torch.nn.Module, ids: torch.Tensor, precision: str) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        hidden = models.causal_lm(model).model(input_ids=ids).last_hidden_state
    hidden[:, -2:].float().pow(2).mean().backward()


def _gradient_difference(pair: dict[str, torch.nn.Module]) -> float:
    """The largest difference between the two systems' adapter gradients, relative to the
    largest gradient."""
    grads = {
        system: [p.grad for p in model.parameters() if p.grad is not None]
        for system, model in pair.items()
    }
    largest = max(g.abs().max().item() for g in grads["peft"])
    differences = (
        (fused - peft).abs().max().item()
        for peft, fused in zip(grads["peft"], grads["fused"], strict=True)
    )
    return max(differences) / largest


def main() -> None:
    args = _arguments()
    if slow_bf16_here(args.precision):
        return
    pair = _models(args.model, torch.bfloat16 if args.precision == "bf16" else torch.float32)
    vocabulary = pair["peft"].config.vocab_size
    ids = torch.randint(0, vocabulary, (args.rows, args.length), generator=torch.Generator())
    seconds: dict[str, list[float]] = {system: [] for system in SYSTEMS}
    for _ in range(args.blocks):
        for system in SYSTEMS:
            pair[system].zero_grad()
            _step(pair[system], ids, args.precision)
            started = time.perf_counter()
            for _ in range(args.steps):
                _step(pair[system], ids, args.precision)
            seconds[system].append((time.perf_counter() - started) / args.steps)
    medians = {system: statistics.median(seconds[system]) for system in SYSTEMS}
    report = {
        "benchmark": "lora_fusion",
        "model": args.model,
        "precision": args.precision,
        "rows": args.rows,
        "length": args.length,
        "threads": torch.get_num_threads(),
        "seconds_a_step": seconds,
        "median_seconds_a_step": medians,
        "speedup": medians["peft"] / medians["fused"],
        "largest_gradient_difference": _gradient_difference(pair),
    }
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    path = output / f"lora_fusion_{args.precision}_{args.rows}x{args.length}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"{args.rows} rows of {args.length}, {args.precision}: peft "
        f"{medians['peft'] * 1000:.0f} ms a step, fused {medians['fused'] * 1000:.0f} ms, "
        f"{report['speedup']:.2f}x; largest gradient difference "
        f"{report['largest_gradient_difference']:.1e} of the largest gradient\n"
        f"results: {path}"
    )


if __name__ == "__main__":
    main()
