"""Training throughput: llama-tune's loop against TRL's SFTTrainer, in one invocation.

Both train the same LoRA (r=8, all linear layers) on the same model (the built-in
SmolLM2-135M-Instruct unless `--model` names another), with the base stored in the same dtype, on
the same prompts and targets (SST-2, or AESLC emails with `--task aeslc`), with the same batch
size, precision and number of steps, and the loss on the target tokens only. Throughput counts
prompt and target tokens (not padding) per second of optimizer steps, after warm-up steps that
are not counted. On a GPU the report adds each trainer's peak memory and model FLOPs
utilisation (model_flops.py).

Run: make bench   (or: python benchmarks/train_throughput.py --steps 30 --precision bf16)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig

from llama_tune import config, data, models, run_folder, schema, train
from model_flops import H200_BF16_DENSE_TFLOPS, lora_training_flops
from trainer_timing import StepTimer

REPO = Path(__file__).resolve().parent.parent


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("LLAMA_TUNE_DATA", "../shared/datasets"))
    parser.add_argument("--model", default="smollm2-135m-instruct", help="built-in, folder or id")
    parser.add_argument("--task", choices=sorted(TASKS), default="sst2")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="measured steps per trainer")
    parser.add_argument("--warmup", type=int, default=5, help="steps run first and not counted")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (ablation)")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="base storage"
    )
    parser.add_argument("--ours-only", action="store_true", help="ablations: skip the TRL run")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results"))
    return parser.parse_args()


TASKS = {
    "sst2": {"source": "classification/sst2", "task": "classification"},
    "aeslc": {
        "source": "summarisation/aeslc",
        "task": "summarisation",
        "template": "Write the subject line of this email.\nEmail: {document}\nSubject:",
    },
}


def _recipe(args: argparse.Namespace, run_dir: Path) -> schema.Recipe:
    task = dict(TASKS[args.task])
    return config.parse(
        {
            "model": {"name": args.model, "dtype": args.dtype},
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
            },
            "logging": {"every": 1},
            "output": {"dir": str(run_dir)},
        },
        "benchmark",
    )


def measure_llama_tune(recipe: schema.Recipe, warmup: int) -> dict[str, float]:
    """Tokens/s of llama-tune's loop over the steps after `warmup`."""
    result = train.run(recipe, "benchmark.yaml")
    records = [
        json.loads(line) for line in (result.run_dir / run_folder.METRICS).read_text().splitlines()
    ]
    counted = [record for record in records if "loss" in record and record["step"] > warmup]
    tokens = sum(record["tokens"] for record in counted)
    seconds = sum(record["seconds"] for record in counted)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def measure_trl(
    recipe: schema.Recipe, warmup: int, neftune_alpha: float | None = None
) -> dict[str, float]:
    """Tokens/s of TRL's SFTTrainer on the same prompts, targets, LoRA and batch size
    (with NEFTune noise of `neftune_alpha`, if given)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tokenizer = models.load_tokenizer(recipe.model.name)
    examples = data.build(recipe.data, tokenizer).train.examples
    # TRL appends the EOS token to the completion itself, as llama-tune does.
    rows = [{"prompt": example.prompt, "completion": f" {example.target}"} for example in examples]

    timer = StepTimer()

    settings = recipe.train
    with tempfile.TemporaryDirectory() as output_dir:
        arguments = SFTConfig(
            output_dir=output_dir,
            max_steps=settings.max_steps,
            per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.lr,
            lr_scheduler_type="constant",
            bf16=settings.precision == "bf16",
            use_cpu=not torch.cuda.is_available(),
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            max_length=recipe.data.max_length,
            packing=False,
            completion_only_loss=True,
            seed=settings.seed,
            dataloader_num_workers=0,
            neftune_noise_alpha=neftune_alpha,
            # TRL turns it on by default; the recipe's setting keeps the work the same.
            gradient_checkpointing=recipe.model.gradient_checkpointing,
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
            peft_config=models.lora_config(recipe.adapter),
            callbacks=[timer],
        )
        collator = trainer.data_collator

        def counting_collator(features: list[dict]) -> dict[str, torch.Tensor]:
            batch = collator(features)
            timer.batch_tokens.append(int(batch["attention_mask"].sum()))
            return batch

        trainer.data_collator = counting_collator
        trainer.train()
    return timer.measured(warmup)


def on_gpu(recipe: schema.Recipe, measure, *args: object) -> dict[str, float]:
    """`measure(recipe, *args)`, with its peak GPU memory and model FLOPs utilisation added when
    it ran on a GPU (the count of model_flops.py, against the H200's dense bf16 peak)."""
    if not torch.cuda.is_available():
        return measure(recipe, *args)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    result = measure(recipe, *args)
    result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    examples = data.build(recipe.data, models.load_tokenizer(recipe.model.name)).train.examples
    input_tokens = sum(len(example.input_ids) for example in examples)
    target_share = sum(example.target_length for example in examples) / input_tokens
    model_config = AutoConfig.from_pretrained(models.resolve(recipe.model.name))
    flops = lora_training_flops(
        model_config,
        result["tokens"],
        round(result["tokens"] * target_share),
        input_tokens / len(examples),
    )
    result["model_tflops_per_s"] = flops / result["seconds"] / 1e12
    result["mfu"] = result["model_tflops_per_s"] / H200_BF16_DENSE_TFLOPS
    return result


def main() -> None:
    args = _arguments()
    with tempfile.TemporaryDirectory() as scratch:
        recipe = _recipe(args, Path(scratch) / "run")
        ours = on_gpu(recipe, measure_llama_tune, args.warmup)
        if args.ours_only:
            print(f"\nllama-tune alone: {json.dumps(ours)} ({vars(args)})")
            return
        peer = on_gpu(recipe, measure_trl, args.warmup)
    report = {
        "benchmark": "train_throughput",
        "model": recipe.model.name,
        "task": args.task,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "precision": args.precision,
        "batch_size": args.batch_size,
        "measured_steps": args.steps,
        "threads": torch.get_num_threads(),
        "llama_tune": ours,
        "trl": peer,
        "ratio": ours["tokens_per_s"] / peer["tokens_per_s"],
    }
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    path = output / f"train_throughput_{args.task}_{args.precision}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\n{args.task}, {args.precision}, batch {args.batch_size}, {args.steps} steps: "
        f"llama-tune {ours['tokens_per_s']:.0f} tokens/s, TRL {peer['tokens_per_s']:.0f} tokens/s, "
        f"ratio {report['ratio']:.2f}x  ({path})"
    )


if __name__ == "__main__":
    main()
