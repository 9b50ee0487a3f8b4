"""The training loop, on Accelerate, top to bottom.

One optimizer step sees `batch_size x grad_accumulation x processes` examples of similar length.
The loss is the sum of target-token cross-entropies divided by the target tokens of the whole
step, so any split of the same step into micro-batches gives the same gradient.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import accelerate
import peft
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from llama_tune import checkpoint, config, data, models, selection
from llama_tune.checkpoint import StopSignals, TrainState, write_json
from llama_tune.errors import UserError

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
RECIPE_COPY = "recipe.yaml"
ADAPTER = "adapter"
FULL_MODEL = "model"
TEACHER_CACHE = "teacher-cache"


def weights_folder(run_dir: Path, recipe: config.Recipe) -> Path:
    """Where a run's trained weights go: adapter/ (LoRA) or model/ (full fine-tuning)."""
    return run_dir / (FULL_MODEL if recipe.adapter is None else ADAPTER)


class TrainError(UserError):
    """The run cannot start or cannot go on (bad run folder, non-finite loss, ...)."""


class Interrupted(Exception):  # noqa: N818 - it is a request to stop, not an error
    """A stop signal arrived; a checkpoint was saved and the process should exit."""

    def __init__(self, exit_code: int, checkpoint_dir: Path) -> None:
        self.exit_code = exit_code
        self.checkpoint_dir = checkpoint_dir
        super().__init__(f"interrupted; checkpoint saved to {checkpoint_dir}")


@dataclass
class RunResult:
    """What a finished run reports back to the CLI."""

    run_dir: Path
    weights_dir: Path
    """adapter/ (LoRA) or model/ (full fine-tuning)."""
    summary: dict[str, Any]


class TargetTokenLoss(torch.nn.Module):
    """Summed cross-entropy over target tokens, with the output head applied only there.

    The vocabulary is wide (49,152 for SmolLM2) and most positions are prompt, so projecting only
    the target positions saves much of the head's compute. Wrapping this as a module lets
    Accelerate prepare it (autocast, DDP) like any model.

    Objectives return named loss sums; `weights` combine them and `counts` says over how many
    positions of an example each is summed (the trainer divides by the step's total).
    """

    weights: ClassVar[dict[str, float]] = {"ce": 1.0}

    def __init__(self, model: peft.PeftModel | transformers.PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def counts(self, example: data.Example) -> dict[str, int]:
        return {"ce": example.target_length}

    def extra_inputs(self, _indices: list[int]) -> dict[str, torch.Tensor]:
        """Tensors the forward needs besides the batch, by training example index: none."""
        return {}

    def rewrite_step(
        self, _step: int, _batches: list[list[data.Example]]
    ) -> list[list[data.Example]] | None:
        """Other examples to train this step on (on-policy distillation); None keeps the data's."""
        return None

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        base = models.causal_lm(self.model)
        hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)
        head = base.get_output_embeddings()
        return {"ce": target_cross_entropy(head, hidden.last_hidden_state[:, :-1], labels)}


def target_cross_entropy(
    head: torch.nn.Module, predicting_states: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Summed cross-entropy of the target tokens, the head applied only where they are predicted.

    `predicting_states` are the final hidden states of positions 0..n-2: position t predicts
    token t + 1.
    """
    logits, targets, _ = target_logits(head, predicting_states, labels)
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


def target_logits(
    head: torch.nn.Module, predicting_states: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(float logits of the positions that predict a target token, those tokens, the
    [batch, n-1] mask of where the positions are), the head applied only there."""
    targets = labels[:, 1:]
    selected = targets != data.IGNORE_INDEX
    return head(predicting_states[selected]).float(), targets[selected], selected


def resolve_precision(precision: str) -> str:
    """Accelerate's mixed-precision name for the recipe's precision; `auto` picks the fastest."""
    if precision == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if _cpu_has_fast_bf16() else "no"
    if precision == "fp16" and not torch.cuda.is_available():
        raise TrainError("train.precision: fp16 needs a CUDA GPU; use bf16 or auto on a CPU")
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a finished or unfinished run unless told to; never half-delete."""
    summary_path = run_dir / SUMMARY
    status = json.loads(summary_path.read_text()).get("status") if summary_path.is_file() else None
    if overwrite and run_dir.exists():
        # A teacher cache is expensive and checks itself against the recipe: it stays.
        for path in run_dir.iterdir():
            if path.is_dir() and path.name != TEACHER_CACHE:
                shutil.rmtree(path)
            elif not path.is_dir():
                path.unlink()
    elif resume:
        if status == "finished":
            raise TrainError(f"{run_dir} holds a finished run; use --overwrite to train again")
        if checkpoint.latest(run_dir) is None:
            raise TrainError(
                f"{run_dir} has no complete checkpoint to resume from; "
                "use --overwrite to start again"
            )
    elif status == "finished":
        raise TrainError(f"{run_dir} holds a finished run; use --overwrite to replace it")
    elif checkpoint.latest(run_dir) is not None or status is not None:
        raise TrainError(
            f"{run_dir} holds an unfinished run; use --resume to continue it or --overwrite"
        )
    run_dir.mkdir(parents=True, exist_ok=True)


def check_resumable(run_dir: Path, recipe: config.Recipe) -> None:
    """Stop when the recipe changed in a way the saved state cannot follow."""
    saved_path = run_dir / RECIPE_COPY
    if not saved_path.is_file():
        raise TrainError(f"{run_dir} has no {RECIPE_COPY}; it cannot be resumed")
    saved = config.load(saved_path)
    changed = checkpoint.changed_resume_keys(saved, recipe)
    if changed:
        raise TrainError(
            f"cannot resume {run_dir}: the recipe changed {', '.join(changed)} "
            f"(see {saved_path}); use --overwrite to start again"
        )


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape the numbers of a run."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }


def _trim_metrics(path: Path, after_step: int) -> None:
    """Drop metric lines past the checkpoint being resumed; they will be written again."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= after_step]
    path.write_text("".join(f"{line}\n" for line in kept))


def _write_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def step_counts(objective: torch.nn.Module, examples: list[data.Example]) -> Counter[str]:
    """Positions each loss term is summed over in these examples."""
    totals: Counter[str] = Counter()
    for example in examples:
        totals.update(objective.counts(example))
    return totals


def combined(objective: torch.nn.Module, sums: dict[str, Any], counts: Counter[str]) -> Any:
    """The weighted sum of each term's mean: the loss the optimizer minimises.

    A term counted over no position (task CE on an on-policy distillation step) is left out.
    """
    return sum(
        objective.weights[name] * sums[name] / counts[name] for name in sums if counts[name] > 0
    )


def _reduced_counts(
    accelerator: Accelerator,
    objective: torch.nn.Module,
    terms: list[str],
    examples: list[data.Example],
    task_targets: bool,
) -> tuple[Counter[str], int]:
    """Term counts and input tokens of rewritten examples, summed over processes.

    Without `task_targets` (on-policy completions) the task cross-entropy counts nothing, nor
    does its copy on adversarial embeddings: both score reference answers the step replaced.
    """
    counts = step_counts(objective, examples)
    if not task_targets:
        counts["ce"] = counts["adversarial_ce"] = 0
    local = [counts[name] for name in terms] + [sum(len(e.input_ids) for e in examples)]
    totals = accelerator.reduce(torch.tensor(local, device=accelerator.device), reduction="sum")
    *term_totals, inputs = (int(value) for value in totals.tolist())
    return Counter(dict(zip(terms, term_totals, strict=True))), inputs


@torch.no_grad()
def eval_losses(
    loss_module: torch.nn.Module,
    objective: torch.nn.Module,
    split: data.Split,
    accelerator: Accelerator,
    batch_size: int,
    pad_token_id: int,
    bucket: int,
) -> dict[str, float]:
    """Mean of each loss term over a split, shared across processes.

    `eval_loss` is the task cross-entropy, comparable across runs; a distillation run adds
    `eval_distill_loss`.
    """
    loss_module.eval()
    names = list(objective.weights)
    totals = torch.zeros(2 * len(names), device=accelerator.device)
    batches = data.eval_batches(split, batch_size)
    for batch in batches[accelerator.process_index :: accelerator.num_processes]:
        tensors = data.collate(batch, pad_token_id, bucket)
        tensors = {name: value.to(accelerator.device) for name, value in tensors.items()}
        sums = loss_module(**tensors)
        counts = step_counts(objective, batch)
        # A term the objective cannot compute here (distillation from a training-split cache)
        # is left out rather than reported as zero.
        for index, name in enumerate(names):
            if name in sums:
                totals[2 * index] += sums[name].float()
                totals[2 * index + 1] += counts[name]
    loss_module.train()
    totals = accelerator.reduce(totals, reduction="sum")
    return {
        "eval_loss" if name == "ce" else f"eval_{name}_loss": (
            totals[2 * index] / totals[2 * index + 1]
        ).item()
        for index, name in enumerate(names)
        if totals[2 * index + 1] > 0
    }


def run(
    recipe: config.Recipe,
    recipe_path: str | Path,
    resume: bool = False,
    overwrite: bool = False,
) -> RunResult:
    """Train the recipe's adapter (or whole model) into its run folder.

    Raises Interrupted on a stop signal, after saving a checkpoint.
    """
    run_dir = config.run_dir(recipe, recipe_path)
    settings = recipe.train
    accelerator = Accelerator(
        mixed_precision=resolve_precision(settings.precision),
        gradient_accumulation_steps=settings.grad_accumulation,
        log_with=list(settings.trackers) or None,
        project_dir=run_dir,
    )
    if accelerator.is_main_process:
        prepare_run_dir(run_dir, resume, overwrite)
        if resume:
            check_resumable(run_dir, recipe)
    accelerator.wait_for_everyone()
    set_seed(settings.seed)

    if recipe.distill is None:
        bundle = models.load(recipe.model, recipe.adapter, accelerator.mixed_precision)
        objective: torch.nn.Module = TargetTokenLoss(bundle.model)
        datasets = data.build(recipe.data, bundle.tokenizer)
    else:
        # Imported here: plain fine-tuning never needs the distillation code.
        from llama_tune.distillation import setup

        bundle, objective, datasets = setup.load(recipe, accelerator, run_dir)
    augment = recipe.adversarial.augment if recipe.adversarial is not None else None
    if augment is not None and augment.consistency is not None:
        from llama_tune.adversarial.consistency import ConsistencyObjective

        objective = ConsistencyObjective(objective, augment.consistency)
    if recipe.adversarial is not None and recipe.adversarial.train is not None:
        from llama_tune.adversarial.embedding import AdversarialObjective

        objective = AdversarialObjective(objective, recipe.adversarial.train)
    tokenizer = bundle.tokenizer
    train_split, validation = datasets.train, datasets.validation
    augmenter = None
    if augment is not None:
        from llama_tune.adversarial.augment import Augmenter

        augmenter = Augmenter(
            augment,
            data.TaskFormatter(recipe.data, datasets.labels),
            tokenizer,
            bundle.model,
            settings.seed,
            accelerator.mixed_precision,
        )
    lengths = [len(example.input_ids) for example in train_split.examples]

    micro_batches_per_step = settings.grad_accumulation * accelerator.num_processes
    step_size = settings.batch_size * micro_batches_per_step
    steps_per_epoch = len(lengths) // step_size
    if steps_per_epoch == 0:
        raise TrainError(
            f"{train_split.stats.origin}: {len(lengths)} usable rows, fewer than one step of "
            f"{step_size} (train.batch_size x train.grad_accumulation x processes)"
        )
    total_steps = settings.max_steps or math.ceil(settings.epochs * steps_per_epoch)
    warmup = settings.warmup_steps
    if warmup is None:
        warmup = round(settings.warmup_ratio * total_steps)

    trainable = [param for param in objective.parameters() if param.requires_grad]
    # Trained parameters outside the model (distillation projections) go into checkpoints too.
    in_model = {id(param) for param in bundle.model.parameters()}
    extras = {
        name: param
        for name, param in objective.named_parameters()
        if param.requires_grad and id(param) not in in_model
    }
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = get_scheduler(
        settings.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )
    # The scheduler is stepped by hand once per optimizer step, so it is not prepared: a
    # prepared scheduler steps once per process.
    loss_module, optimizer = accelerator.prepare(objective, optimizer)

    state = TrainState(recipe_hash=checkpoint.recipe_hash(recipe))
    metrics_path = run_dir / METRICS
    summary_path = run_dir / SUMMARY
    if resume:
        resumed_from = checkpoint.latest(run_dir)
        assert resumed_from is not None
        state = checkpoint.load(
            resumed_from, bundle.model, optimizer, scheduler, accelerator.process_index, extras
        )
        if accelerator.is_main_process:
            _trim_metrics(metrics_path, state.step)
            print(f"resuming from {resumed_from} (step {state.step})")
    elif accelerator.is_main_process:
        (run_dir / RECIPE_COPY).write_text(config.to_yaml(recipe))
        metrics_path.write_text("")

    pad_id = tokenizer.pad_token_id
    eval_args = (objective, validation, accelerator, settings.batch_size, pad_id)
    has_validation = validation is not None and bool(validation.examples)
    probe = None
    if settings.eval_metric_rows is not None and accelerator.is_main_process:
        probe = selection.MetricProbe.load(recipe, tokenizer, accelerator.mixed_precision)

    def evaluate(step: int) -> dict[str, Any]:
        """Eval loss (all processes) and task metrics (main process) at `step`, logged."""
        record = {"step": step, **eval_losses(loss_module, *eval_args, settings.length_bucket)}
        if probe is not None:
            record |= probe.score(accelerator.unwrap_model(loss_module).model)
            loss_module.train()
        if accelerator.is_main_process:
            _write_metrics(metrics_path, record)
        accelerator.log(record, step=step)
        return record

    summary = json.loads(summary_path.read_text()) if resume and summary_path.is_file() else {}
    trainable_count, total_count = models.parameter_counts(bundle.model)
    summary.update(
        status="running",
        run_dir=str(run_dir),
        model=recipe.model.name,
        precision=accelerator.mixed_precision,
        processes=accelerator.num_processes,
        parameters={"trainable": trainable_count, "total": total_count},
        data=datasets.summary(),
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        versions=library_versions(),
    )
    if has_validation and "eval_loss_before" not in summary:
        summary["eval_loss_before"] = evaluate(0)["eval_loss"]
    if accelerator.is_main_process:
        write_json(summary_path, summary)
    if settings.trackers:
        accelerator.init_trackers(run_dir.name, config=_flat_config(recipe))

    loss_module.train()
    progress = tqdm(
        total=total_steps,
        initial=state.step,
        disable=not accelerator.is_main_process,
        desc="train",
        dynamic_ncols=True,
    )
    terms = list(objective.weights)
    window_sums: Counter[str] = Counter()
    window_counts: Counter[str] = Counter()
    window_inputs = 0
    window_start = time.perf_counter()
    train_seconds = summary.get("train_seconds", 0.0)
    input_tokens = summary.get("input_tokens", 0)
    with StopSignals() as signals:
        while state.step < total_steps:
            plan = data.plan_epoch(
                lengths, step_size, torch.Generator().manual_seed(settings.seed + state.epoch)
            )
            for step_examples in plan[state.step_in_epoch :]:
                if state.step >= total_steps:
                    break
                step_started = time.perf_counter()
                batches = data.micro_batches(step_examples, lengths, micro_batches_per_step)
                own = batches[accelerator.process_index :: accelerator.num_processes]
                counts = step_counts(objective, [train_split.examples[i] for i in step_examples])
                step_inputs = sum(lengths[i] for i in step_examples)
                own_examples = [[train_split.examples[i] for i in indices] for indices in own]
                rewritten = objective.rewrite_step(state.step, own_examples)
                if rewritten is not None:
                    own_examples = rewritten
                if augmenter is not None:
                    own, own_examples = augmenter.training_batches(state.step, own, own_examples)
                if rewritten is not None or augmenter is not None:
                    # Other examples than planned: new counts, summed over every process's
                    # micro-batches. An on-policy step (the student's own completions) has no
                    # task cross-entropy.
                    mine = [example for batch in own_examples for example in batch]
                    counts, step_inputs = _reduced_counts(
                        accelerator, objective, terms, mine, task_targets=rewritten is None
                    )
                step_sums = torch.zeros(len(terms), device=accelerator.device)
                for indices, examples in zip(own, own_examples, strict=True):
                    batch = data.collate(examples, pad_id, settings.length_bucket)
                    batch |= objective.extra_inputs(indices)
                    batch = {name: value.to(accelerator.device) for name, value in batch.items()}
                    with accelerator.accumulate(loss_module):
                        sums = loss_module(**batch)
                        # Accelerate divides each backward by grad_accumulation and DDP averages
                        # over processes; scaling by both makes the step's gradient that of the
                        # weighted per-term means over the whole step.
                        loss = combined(objective, sums, counts) * micro_batches_per_step
                        accelerator.backward(loss)
                    step_sums += torch.stack([sums[name].detach().float() for name in terms])
                # .tolist() syncs with the device once per step.
                step_sums = accelerator.reduce(step_sums, reduction="sum").tolist()
                # Terms counted over no position this step (task CE on an on-policy step) are
                # left out of the loss and the logs.
                term_sums = {
                    name: value
                    for name, value in zip(terms, step_sums, strict=True)
                    if counts[name] > 0
                }
                loss_value = combined(objective, term_sums, counts)
                grad_norm = None
                if math.isfinite(loss_value):
                    if settings.max_grad_norm is not None:
                        grad_norm = accelerator.clip_grad_norm_(trainable, settings.max_grad_norm)
                        grad_norm = float(grad_norm)
                    optimizer.step()
                    scheduler.step()
                else:
                    state.nonfinite_steps += 1
                    if state.nonfinite_steps > settings.max_nonfinite_steps:
                        raise TrainError(
                            f"non-finite loss ({loss_value}) at step {state.step + 1}; "
                            "lower train.lr, use fp32, or allow skips with "
                            "train.max_nonfinite_steps"
                        )
                    accelerator.print(f"skipping step {state.step + 1}: loss is {loss_value}")
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.step_in_epoch += 1
                state.tokens += counts["ce"]
                input_tokens += step_inputs
                train_seconds += time.perf_counter() - step_started
                window_inputs += step_inputs
                if math.isfinite(loss_value):
                    window_sums.update(term_sums)
                    window_counts.update(counts)
                progress.update(1)

                if state.step % settings.log_steps == 0 or state.step == total_steps:
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "step": state.step,
                        "epoch": state.epoch + state.step_in_epoch / len(plan),
                        "loss": combined(objective, window_sums, window_counts),
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": grad_norm,
                        "tokens": window_inputs,
                        "seconds": elapsed,
                        "tokens_per_s": window_inputs / elapsed if elapsed > 0 else None,
                    }
                    if len(terms) > 1:
                        # Each term's own mean, unweighted: task CE and distillation apart.
                        for name in terms:
                            if window_counts[name] > 0:
                                record[f"{name}_loss"] = window_sums[name] / window_counts[name]
                    summary.setdefault("train_loss_first", record["loss"])
                    summary["train_loss_last"] = record["loss"]
                    progress.set_postfix(
                        loss=f"{record['loss']:.4f}",
                        lr=f"{record['lr']:.2e}",
                        tok_s=f"{record['tokens_per_s'] or 0:.0f}",
                    )
                    if accelerator.is_main_process:
                        _write_metrics(metrics_path, record)
                    accelerator.log(record, step=state.step)
                    window_sums.clear()
                    window_counts.clear()
                    window_inputs = 0
                    window_start = time.perf_counter()

                eval_due = state.step == total_steps or (
                    settings.eval_steps and state.step % settings.eval_steps == 0
                )
                if has_validation and eval_due:
                    record = evaluate(state.step)
                    summary["eval_loss_after"] = record["eval_loss"]
                    if settings.best_metric and accelerator.is_main_process:
                        model = accelerator.unwrap_model(loss_module).model
                        _keep_if_best(
                            run_dir, model, tokenizer, settings.best_metric, record, state
                        )
                    window_start = time.perf_counter()

                save_due = settings.save_steps and state.step % settings.save_steps == 0
                stop = _any_process(accelerator, signals.requested is not None)
                if (save_due or stop) and state.step < total_steps:
                    summary.update(
                        status="interrupted" if stop else "running",
                        train_seconds=train_seconds,
                        input_tokens=input_tokens,
                        state=asdict(state),
                    )
                    saved = _save_checkpoint(
                        accelerator,
                        run_dir,
                        bundle.model,
                        optimizer,
                        scheduler,
                        state,
                        summary,
                        settings.keep_last_checkpoints,
                        extras,
                    )
                    if stop:
                        progress.close()
                        raise Interrupted(signals.exit_code, saved)
            else:
                state.epoch += 1
                state.step_in_epoch = 0
    progress.close()

    weights_dir = weights_folder(run_dir, recipe)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(loss_module).model.save_pretrained(weights_dir)
        tokenizer.save_pretrained(weights_dir)
        summary.update(
            status="finished",
            steps=state.step,
            epochs=state.epoch + state.step_in_epoch / max(steps_per_epoch, 1),
            nonfinite_steps=state.nonfinite_steps,
            target_tokens=state.tokens,
            input_tokens=input_tokens,
            train_seconds=train_seconds,
            tokens_per_s=input_tokens / train_seconds if train_seconds else None,
            weights=str(weights_dir),
            best=selection.best_record(run_dir),
        )
        write_json(summary_path, summary)
    accelerator.end_training()
    return RunResult(run_dir=run_dir, weights_dir=weights_dir, summary=summary)


def _keep_if_best(
    run_dir: Path,
    model: peft.PeftModel | transformers.PreTrainedModel,
    tokenizer: Any,
    metric: str,
    record: dict[str, Any],
    state: TrainState,
) -> None:
    """Save the adapter to best/ when this eval beats every earlier one on `metric`."""
    value = record[metric if metric == selection.EVAL_LOSS else f"eval_{metric}"]
    if selection.is_better(metric, value, state.best_value):
        selection.save_best(run_dir, model, tokenizer, state.step, metric, value)
        state.best_step, state.best_value = state.step, value


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process when it is true on any: all must stop at the same step."""
    if accelerator.num_processes == 1:
        return flag
    # One tiny all-reduce per step; without it a signal seen by one rank would deadlock the rest.
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device)).item())


def _save_checkpoint(
    accelerator: Accelerator,
    run_dir: Path,
    model: peft.PeftModel | transformers.PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    summary: dict[str, Any],
    keep_last: int,
    extras: dict[str, torch.nn.Parameter],
) -> Path:
    """Checkpoint on the main process, with every process's RNG states, then record progress in
    the summary."""
    process_rng_states = gather_object([checkpoint.rng_states()])
    saved = run_dir / checkpoint.CHECKPOINTS
    if accelerator.is_main_process:
        saved = checkpoint.save(
            run_dir, model, optimizer, scheduler, state, keep_last, process_rng_states, extras
        )
        write_json(run_dir / SUMMARY, summary)
    accelerator.wait_for_everyone()
    return saved


def _flat_config(recipe: config.Recipe) -> dict[str, Any]:
    """The recipe as flat `section.key` scalars, the form trackers accept."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            scalar = isinstance(value, int | float | str | bool)
            flat[prefix] = value if scalar else str(value)

    walk("", recipe.model_dump(mode="json"))
    return flat
