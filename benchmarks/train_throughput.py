"""Training throughput and memory: llama-tune's loop against TRL's SFTTrainer, side by side.

Both train the same LoRA (r=8, all linear layers) on the same model (the built-in
SmolLM2-135M-Instruct unless `--model` names another), with the base stored in the same dtype, on
the same prompts and targets (SST-2; AESLC emails with `--task aeslc`; the alpaca_en_demo
instructions in the model's chat template with `--task alpaca`), with the same batch size,
precision and number of steps, and the loss on the target tokens only. On instruction data each
system packs: llama-tune with `train.packing` (its default there), TRL with `padding_free=True`,
its fastest setting for rows of mixed length. Throughput counts prompt and target tokens (not
padding) per second of optimizer steps, after warm-up steps that are not counted.

The systems alternate, each measurement in a fresh process (side_by_side.py), for `--rounds`
rounds: the report gives medians, the per-round ratios, each process's peak resident memory,
both systems' losses (they learn the same), and model FLOPs utilisation against the sustained
matrix-product rate this machine showed in the same invocation (on a GPU, against the H200's
dense bf16 peak, with peak GPU memory).

Run: make bench   (or: python benchmarks/train_throughput.py --task alpaca --precision bf16)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from llama_tune import allocator, config, data, models, run_folder, schema, train
from model_flops import (
    H200_BF16_DENSE_TFLOPS,
    cpu_matmul_gflops,
    lora_training_flops,
    slow_bf16_here,
)
from side_by_side import add_tcmalloc_argument, alternate, peak_resident_gib, summary
from trainer_timing import StepTimer, measured_losses

REPO = Path(__file__).resolve().parent.parent

TASKS = {
    "sst2": {"source": "classification/sst2", "task": "classification"},
    "aeslc": {
        "source": "summarisation/aeslc",
        "task": "summarisation",
        "template": "Write the subject line of this email.\nEmail: {document}\nSubject:",
    },
    "alpaca": {"source": "instruction/alpaca_en_demo", "task": "instruction"},
}
DEFAULT_MAX_LENGTH = {"sst2": 128, "aeslc": 512, "alpaca": 1024}


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("LLAMA_TUNE_DATA", "../shared/datasets"))
    parser.add_argument("--model", default="smollm2-135m-instruct", help="built-in, folder or id")
    parser.add_argument("--task", choices=sorted(TASKS), default="sst2")
    parser.add_argument("--max-length", type=int, help="default: 128, 512, 1024 by task")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per measurement")
    parser.add_argument("--warmup", type=int, default=4, help="steps run first and not counted")
    parser.add_argument("--rounds", type=int, default=3, help="A B rounds")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (ablation)")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="base storage"
    )
    parser.add_argument("--packing", choices=["auto", "on", "off"], default="auto")
    parser.add_argument(
        "--compile", action="store_true", help="llama-tune's model.compile (in the warm-up)"
    )
    parser.add_argument("--ours-only", action="store_true", help="ablations: skip the TRL runs")
    add_tcmalloc_argument(parser)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--worker", choices=["llama-tune", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.max_length = args.max_length or DEFAULT_MAX_LENGTH[args.task]
    return args


def _recipe(args: argparse.Namespace, run_dir: Path) -> schema.Recipe:
    task = dict(TASKS[args.task])
    packing = {"auto": None, "on": True, "off": False}[args.packing]
    return config.parse(
        {
            "model": {"name": args.model, "dtype": args.dtype, "compile": args.compile},
            "adapter": {"r": 8, "alpha": 16, "dropout": args.dropout},
            "data": {
                **task,
                "source": str(Path(args.data) / task["source"]),
                "max_train_rows": args.rows,
                "max_length": args.max_length,
                "splits": {"validation": None},
            },
            "train": {
                "max_steps": args.warmup + args.steps,
                "batch_size": args.batch_size,
                "lr": 2e-4,
                "warmup_steps": 0,
                "scheduler": "constant",
                "precision": args.precision,
                "packing": packing,
            },
            "logging": {"every": 1},
            "output": {"dir": str(run_dir)},
        },
        "benchmark",
    )


def measure_llama_tune(recipe: schema.Recipe, warmup: int) -> dict[str, Any]:
    """Tokens/s of llama-tune's loop over the steps after `warmup`, and those steps' losses."""
    result = train.run(recipe, "benchmark.yaml")
    records = [
        json.loads(line) for line in (result.run_dir / run_folder.METRICS).read_text().splitlines()
    ]
    counted = [record for record in records if "loss" in record and record["step"] > warmup]
    tokens = sum(record["tokens"] for record in counted)
    seconds = sum(record["seconds"] for record in counted)
    losses = [record["loss"] for record in counted]
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds} | {
        "losses": losses,
        "mean_loss": statistics.fmean(losses),
    }


def planned_examples(recipe: schema.Recipe, examples: list[data.Example]) -> list[data.Example]:
    """The examples of llama-tune's steps in order: its first epoch plan (its loop's generator
    and, where it pads, length grouping), cut to the recipe's steps. A peer reading them in sequence
    (`train_sampling_strategy="sequential"`) takes the same examples at every step, so the
    two count the same tokens and their peaks compare. The benchmarks' recipes run one process,
    no accumulation and no more steps than one epoch holds, where this is the loop's plan."""
    settings = recipe.train
    plan = data.plan_epoch(
        [len(example.input_ids) for example in examples],
        settings.batch_size,
        torch.Generator().manual_seed(settings.seed),
        not recipe.packed,
    )
    assert settings.grad_accumulation == 1
    assert len(plan) >= settings.max_steps
    return [examples[index] for step in plan[: settings.max_steps] for index in step]


def measure_trl(
    recipe: schema.Recipe, warmup: int, neftune_alpha: float | None = None
) -> dict[str, Any]:
    """Tokens/s of TRL's SFTTrainer on the same prompts, targets, LoRA and batch size (with
    NEFTune noise of `neftune_alpha`, if given), padding-free when llama-tune packs."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tokenizer = models.load_tokenizer(recipe.model.name)
    examples = planned_examples(recipe, data.build(recipe.data, tokenizer).train.examples)
    settings = recipe.train
    # TRL appends the EOS token to the completion itself, as llama-tune does. An instruction
    # example's prompt is already rendered in the chat template, up to the answer.
    separator = "" if recipe.data.task == "instruction" else " "
    rows = [{"prompt": e.prompt, "completion": f"{separator}{e.target}"} for e in examples]
    timer = StepTimer()
    padding_free = recipe.packed
    with tempfile.TemporaryDirectory() as output_dir:
        arguments = SFTConfig(
            output_dir=output_dir,
            max_steps=settings.max_steps,
            per_device_train_batch_size=settings.batch_size,
            train_sampling_strategy="sequential",
            learning_rate=settings.lr,
            lr_scheduler_type="constant",
            bf16=settings.precision == "bf16",
            use_cpu=not torch.cuda.is_available(),
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            # Padding-free TRL does not cut rows; llama-tune's rows are already within it.
            max_length=None if padding_free else recipe.data.max_length,
            packing=False,
            padding_free=padding_free,
            completion_only_loss=True,
            seed=settings.seed,
            dataloader_num_workers=0,
            neftune_noise_alpha=neftune_alpha,
            # TRL turns it on by default; the recipe's setting keeps the work the same.
            gradient_checkpointing=recipe.model.gradient_checkpointing,
            # Where llama-tune compiles its layers, TRL compiles its model (its own way).
            torch_compile=recipe.model.compile,
        )
        # The same storage dtype as llama-tune's (bf16 under bf16 autocast): only the loops differ.
        mixed_precision = "bf16" if settings.precision == "bf16" else "no"
        model = AutoModelForCausalLM.from_pretrained(
            models.resolve(recipe.model.name),
            dtype=models.storage_dtype(recipe.model, mixed_precision),
        )
        trainer = SFTTrainer(
            model=model,
            args=arguments,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=models.lora_config(recipe.adapter, model),
            callbacks=[timer],
        )
        collator = trainer.data_collator

        def counting_collator(features: list[dict]) -> dict[str, torch.Tensor]:
            batch = collator(features)
            # A padding-free row has no padding and no attention mask.
            mask = batch.get("attention_mask")
            tokens = batch["input_ids"].numel() if mask is None else mask.sum()
            timer.batch_tokens.append(int(tokens))
            return batch

        trainer.data_collator = counting_collator
        trainer.train()
    return timer.measured(warmup) | measured_losses(trainer, warmup)


def worker(args: argparse.Namespace) -> None:
    """One measurement of one system in this process; the JSON goes to `args.result`."""
    with tempfile.TemporaryDirectory() as scratch:
        recipe = _recipe(args, Path(scratch) / "run")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        measure = measure_llama_tune if args.worker == "llama-tune" else measure_trl
        result = measure(recipe, args.warmup)
    result["peak_rss_gib"] = peak_resident_gib()
    result["malloc"] = allocator.loaded_allocator()
    if torch.cuda.is_available():
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    Path(args.result).write_text(json.dumps(result))


def flop_counter(recipe: schema.Recipe) -> Callable[[dict[str, Any]], float]:
    """The model FLOPs of a measurement's tokens (model_flops.py's count), with the data's
    target share and mean row length."""
    examples = data.build(recipe.data, models.load_tokenizer(recipe.model.name)).train.examples
    input_tokens = sum(len(example.input_ids) for example in examples)
    target_share = sum(example.target_length for example in examples) / input_tokens
    model_config = AutoConfig.from_pretrained(models.resolve(recipe.model.name))

    def count(result: dict[str, Any]) -> float:
        target_tokens = round(result["tokens"] * target_share)
        mean_length = input_tokens / len(examples)
        return lora_training_flops(model_config, result["tokens"], target_tokens, mean_length)

    return count


def main() -> None:
    args = _arguments()
    if args.worker:
        worker(args)
        return
    if slow_bf16_here(args.precision):
        return
    on_gpu = torch.cuda.is_available()
    # The machine's own ceiling, measured now: the same conditions as the runs.
    matmul = None if on_gpu else cpu_matmul_gflops(args.precision)
    peak_tflops = H200_BF16_DENSE_TFLOPS if on_gpu else matmul / 1000
    systems = ["llama-tune"] if args.ours_only else ["llama-tune", "trl"]
    runs = alternate(Path(__file__), sys.argv[1:], systems, args.rounds, args.tcmalloc)
    with tempfile.TemporaryDirectory() as scratch:
        recipe = _recipe(args, Path(scratch) / "run")
    model_flops = flop_counter(recipe)
    for system_runs in runs.values():
        for result in system_runs:
            result["mfu"] = model_flops(result) / result["seconds"] / 1e12 / peak_tflops
    report: dict[str, Any] = {
        "benchmark": "train_throughput",
        "model": recipe.model.name,
        "task": args.task,
        "packed": recipe.packed,
        "compiled": recipe.model.compile,
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "precision": args.precision,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "measured_steps": args.steps,
        "threads": torch.get_num_threads(),
        "matmul_gflops": matmul,
        "mfu_peak_tflops": peak_tflops,
        "runs": runs,
    }
    if not args.ours_only:
        report |= summary(runs, "llama-tune", "trl")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    compiled = "_compiled" if args.compile else ""
    path = output / f"train_throughput_{args.task}_{args.precision}{compiled}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(describe(report, path))


def describe(report: dict[str, Any], path: Path) -> str:
    """The report's medians in a few lines."""
    ceiling = f"MFU of {1000 * report['mfu_peak_tflops']:.0f} GFLOP/s"
    lines = [f"\n{report['task']}, {report['precision']}, batch {report['batch_size']}, {ceiling}:"]
    for system, system_runs in report["runs"].items():
        median = statistics.median
        lines.append(
            f"  {system}: {median(r['tokens_per_s'] for r in system_runs):.0f} tokens/s, "
            f"peak {median(r['peak_rss_gib'] for r in system_runs):.2f} GiB resident, "
            f"MFU {100 * median(r['mfu'] for r in system_runs):.1f}%, "
            f"mean loss {median(r['mean_loss'] for r in system_runs):.3f}, "
            f"malloc {'/'.join(sorted({r['malloc'] for r in system_runs}))}"
        )
    if "speed_ratio" in report:
        lines.append(
            f"  ratio (median of {report['rounds']} rounds): speed {report['speed_ratio']:.2f}x, "
            f"memory {report['memory_ratio']:.2f}x  ({path})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
