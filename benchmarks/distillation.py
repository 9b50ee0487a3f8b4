"""Distillation: step throughput (online, cached teacher, TRL's GKDTrainer) and loss memory.

Throughput: the built-in SmolLM2-135M-Instruct (or `--teacher`) teaches a half-depth copy of
itself (every second layer and the last), fully fine-tuned, on the same encoded SST-2 prompts and
answers, with the same batch size, precision and steps, forward KL at temperature 1 on the answer
tokens only and no task loss, in three trainers:
- llama-tune with the teacher online,
- llama-tune reading a teacher cache (top-k 64; the cache build is timed separately),
- TRL's GKDTrainer with lmbda=0 (no student generation) and beta=0 (forward KL), fed the same
  batches by the same collator: llama-tune's steps (its length-grouped plan), read in order.
Throughput counts prompt and answer tokens (not padding) per second of optimizer steps, after
warm-up steps that are not counted. The three alternate, each measurement in a fresh process
(side_by_side.py), for `--rounds` rounds: medians, per-round ratios against GKDTrainer, each
process's peak resident memory and the losses.

Memory: the peak resident memory added by computing the distillation loss and its gradient for
`--positions` positions over the 49,152-token vocabulary, each way in a fresh process: naive
(full logits of both models, as GKDTrainer does) against chunked (`distill.chunk_size` 128).

With `--compile`, llama-tune compiles the student's decoder layers (`model.compile`, during the
warm-up steps) and GKDTrainer its student (`torch_compile`); the results go to
distillation_compiled.json.

Run: python benchmarks/distillation.py   (--steps, --batch-size, --positions, --only, --compile)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

import train_throughput
from llama_tune import allocator, config, data, models, schema
from llama_tune.distillation import loading, losses, student
from model_flops import slow_bf16_here
from side_by_side import add_tcmalloc_argument, alternate, peak_resident_gib, summary
from trainer_timing import StepTimer, measured_losses

REPO = Path(__file__).resolve().parent.parent
SYSTEMS = ["llama-tune online", "llama-tune cached", "trl gkd"]


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("LLAMA_TUNE_DATA", "../shared/datasets"))
    parser.add_argument("--teacher", default="smollm2-135m-instruct", help="built-in, folder, id")
    parser.add_argument("--steps", type=int, default=12, help="measured steps per trainer")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three trainers")
    parser.add_argument("--warmup", type=int, default=3, help="steps run first and not counted")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--positions", type=int, default=2048, help="memory: distilled positions")
    parser.add_argument("--only", choices=["throughput", "memory"], help="run one part")
    parser.add_argument(
        "--compile", action="store_true", help="the student's model.compile; TRL's torch_compile"
    )
    add_tcmalloc_argument(parser)
    parser.add_argument("--memory-mode", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args()


def kept_layers(teacher: str) -> list[int]:
    """Every second layer of the teacher and its last: the student's layers."""
    depth = AutoConfig.from_pretrained(models.resolve(teacher)).num_hidden_layers
    return [*range(0, depth - 2, 2), depth - 1]


def _recipe(args: argparse.Namespace, run_dir: Path, cached: bool) -> schema.Recipe:
    steps = args.warmup + args.steps
    distill = {
        "teacher": {"name": args.teacher},
        "student": {"from_teacher": {"keep_layers": kept_layers(args.teacher)}},
        "loss": "forward_kl",
        "alpha": 1.0,
    }
    if cached:
        distill["cache"] = {"top_k": 64}
    return config.parse(
        {
            "model": {"name": args.teacher, "compile": args.compile},
            "adapter": None,
            "data": {
                "source": str(Path(args.data) / "classification" / "sst2"),
                "task": "classification",
                "template": "Review: {text}\nSentiment (positive or negative):",
                "max_train_rows": steps * args.batch_size,
                "max_length": 128,
                "splits": {"validation": None},
            },
            "train": {
                "max_steps": steps,
                "batch_size": args.batch_size,
                "lr": 5e-5,
                "warmup_steps": 0,
                "scheduler": "constant",
                "precision": args.precision,
            },
            "logging": {"every": 1},
            "distill": distill,
            "output": {"dir": str(run_dir)},
        },
        "benchmark",
    )


def measure_llama_tune(recipe: schema.Recipe, warmup: int) -> dict[str, Any]:
    """train_throughput's measurement, plus the wall time of the whole run (a cached run's
    includes building the cache)."""
    started = time.perf_counter()
    measured = train_throughput.measure_llama_tune(recipe, warmup)
    return measured | {"wall_seconds": time.perf_counter() - started}


def measure_trl(args: argparse.Namespace, recipe: schema.Recipe, scratch: Path) -> dict[str, Any]:
    """Tokens/s of TRL's GKDTrainer on the same batches, teacher and student."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    assert recipe.distill is not None
    tokenizer = models.load_tokenizer(recipe.model.name)
    built = data.build(recipe.data, tokenizer).train.examples
    examples = train_throughput.planned_examples(recipe, built)
    precision = "bf16" if args.precision == "bf16" else "no"
    teacher = loading.load_teacher(recipe.distill, precision)
    # The same starting student as llama-tune's, saved so TRL loads it like any model.
    student_dir = scratch / "student"
    keep = kept_layers(args.teacher)
    student.from_teacher(teacher, keep).float().save_pretrained(student_dir)

    timer = StepTimer()

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        batch = [data.Example("", "", f["input_ids"], f["prompt_length"], 0) for f in features]
        timer.batch_tokens.append(sum(len(example.input_ids) for example in batch))
        return data.collate(batch, tokenizer.pad_token_id, recipe.train.length_bucket)

    rows = [{"input_ids": e.input_ids, "prompt_length": e.prompt_length} for e in examples]
    settings = recipe.train
    arguments = GKDConfig(
        output_dir=str(scratch / "trl"),
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        train_sampling_strategy="sequential",
        learning_rate=settings.lr,
        lr_scheduler_type="constant",
        bf16=args.precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        lmbda=0.0,
        beta=0.0,
        temperature=1.0,
        seed=settings.seed,
        dataloader_num_workers=0,
        # TRL turns it on by default; the recipe's setting keeps the work the same.
        gradient_checkpointing=recipe.model.gradient_checkpointing,
        # Where llama-tune compiles the student's layers, TRL compiles its student its own way.
        torch_compile=recipe.model.compile,
    )
    trainer = GKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(student_dir),
        teacher_model=teacher,
        args=arguments,
        data_collator=collate,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.train()
    return timer.measured(args.warmup) | measured_losses(trainer, args.warmup)


def worker(args: argparse.Namespace) -> None:
    """One measurement of one trainer in this process; the JSON goes to `args.result`."""
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        if args.worker == "trl gkd":
            result = measure_trl(args, _recipe(args, scratch / "trl-recipe", False), scratch)
        else:
            cached = args.worker == "llama-tune cached"
            result = measure_llama_tune(_recipe(args, scratch / "run", cached), args.warmup)
    result["peak_rss_gib"] = peak_resident_gib()
    result["malloc"] = allocator.loaded_allocator()
    Path(args.result).write_text(json.dumps(result))


def _peak_rss_bytes() -> int:
    # ru_maxrss is in kilobytes on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(mode: str, positions: int) -> None:
    """In a fresh process: peak memory added by one loss + backward; prints JSON."""
    torch.manual_seed(0)
    vocab, width = 49152, 576
    student_head = torch.nn.Linear(width, vocab, bias=False)
    teacher_head = torch.nn.Linear(width, vocab, bias=False).requires_grad_(False)
    hidden = torch.randn(positions, width, requires_grad=True)
    teacher_hidden = torch.randn(positions, width)
    # Warm up the kernels on a few positions, so only the measured size counts.
    losses.divergence(student_head(hidden[:4]), teacher_head(teacher_hidden[:4]), "forward_kl")
    before = _peak_rss_bytes()
    started = time.perf_counter()
    if mode == "naive":
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden)
        value = losses.divergence(student_head(hidden), teacher_logits, "forward_kl").sum()
    else:
        teacher = losses.OnlineTeacher(teacher_hidden, teacher_head, vocab)
        value = losses.chunked_distillation(hidden, student_head, teacher, "forward_kl")
    value.backward()
    seconds = time.perf_counter() - started
    print(json.dumps({"added_bytes": _peak_rss_bytes() - before, "seconds": seconds}))


def measure_memory(positions: int) -> dict[str, dict[str, float]]:
    results = {}
    for mode in ("naive", "chunked"):
        # A fixed mmap threshold makes glibc return every large freed block at once, so the
        # peak resident size follows the tensors alive, not the allocator's cached heap.
        environment = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
        done = subprocess.run(
            [sys.executable, __file__, "--memory-mode", mode, "--positions", str(positions)],
            capture_output=True,
            text=True,
            check=True,
            env=environment,
        )
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def main() -> None:
    args = _arguments()
    if args.memory_mode:
        memory_child(args.memory_mode, args.positions)
        return
    if args.worker:
        worker(args)
        return
    report: dict = {"benchmark": "distillation", "threads": torch.get_num_threads()}
    if args.only in (None, "memory"):
        memory = measure_memory(args.positions)
        report["memory"] = {"positions": args.positions, **memory}
        naive, chunked = memory["naive"]["added_bytes"], memory["chunked"]["added_bytes"]
        print(
            f"\nloss memory, {args.positions} positions x 49,152 vocabulary: naive "
            f"{naive / 2**20:.0f} MiB, chunked {chunked / 2**20:.0f} MiB ({naive / chunked:.1f}x)"
        )
    if args.only in (None, "throughput") and not slow_bf16_here(args.precision):
        runs = alternate(Path(__file__), sys.argv[1:], SYSTEMS, args.rounds, args.tcmalloc)
        online = summary(runs, "llama-tune online", "trl gkd")
        cached = summary(runs, "llama-tune cached", "trl gkd")
        report["throughput"] = {
            "precision": args.precision,
            "compiled": args.compile,
            "batch_size": args.batch_size,
            "measured_steps": args.steps,
            "rounds": args.rounds,
            "runs": runs,
            "median": online["median"],
            "online_vs_trl": online["speed_ratio"],
            "online_vs_trl_rounds": online["speed_ratios"],
            "online_memory_vs_trl": online["memory_ratio"],
            "cached_vs_trl": cached["speed_ratio"],
            "cached_vs_trl_rounds": cached["speed_ratios"],
            "cached_memory_vs_trl": cached["memory_ratio"],
        }
        medians = online["median"]
        speeds = ", ".join(f"{name} {medians[name]['tokens_per_s']:.0f}" for name in SYSTEMS)
        memory = ", ".join(f"{name} {medians[name]['peak_rss_gib']:.2f}" for name in SYSTEMS)
        print(f"\ntokens/s, median of {args.rounds} rounds: {speeds}")
        print(f"peak resident GiB: {memory}")
        print(
            f"online / TRL {online['speed_ratio']:.2f}x, cached / TRL {cached['speed_ratio']:.2f}x"
        )
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    path = output / f"distillation{'_compiled' if args.compile else ''}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
