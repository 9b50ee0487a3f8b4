"""The training loop, on Accelerate, top to bottom.

One optimizer step sees `batch_size x grad_accumulation x processes` examples of similar length.
The loss is the sum of target-token cross-entropies divided by the target tokens of the whole
step, so any split of the same step into micro-batches gives the same gradient.

`run` claims the run folder, then a `TrainingRun` sets up (accelerator, models and objective,
step plan, optimizer, resume or start) and trains: each step is planned, rewritten if the
objective or augmenter asks, run in micro-batches, logged, evaluated and checkpointed.
"""

from __future__ import annotations

import json
import math
import secrets
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_scheduler

from llama_tune import (
    agreement,
    assembly,
    checkpoint,
    config,
    data,
    models,
    run_folder,
    schema,
    scoring,
    validation,
)
from llama_tune.checkpoint import StopSignals, TrainState
from llama_tune.errors import UserError
from llama_tune.jsonfiles import read_json, write_json
from llama_tune.layout import adamw, most_of_processes, trained_extras, trained_parameters
from llama_tune.objective import ModelCalls, Objective, combined, step_counts
from llama_tune.runtime import (
    PROCESS_GROUP_TIMEOUT,
    check_launch,
    device_name,
    library_versions,
    peak_memory_gib,
    resolve_precision,
)


class TrainError(UserError):
    """The run cannot start or cannot go on (bad run folder, non-finite loss, ...)."""


class Interrupted(Exception):  # noqa: N818 - it is a request to stop, not an error
    """A stop signal arrived; a checkpoint was saved and the process should exit."""

    def __init__(self, exit_code: int, run_dir: Path, checkpoint_dir: Path) -> None:
        self.exit_code = exit_code
        self.run_dir = run_dir
        self.checkpoint_dir = checkpoint_dir
        super().__init__(f"interrupted; checkpoint saved to {checkpoint_dir}")


@dataclass
class RunResult:
    """What a finished run reports back to the CLI."""

    run_dir: Path
    weights_dir: Path
    """adapter/ (LoRA) or model/ (full fine-tuning)."""
    summary: dict[str, Any]


@dataclass
class StepPlan:
    """How many optimizer steps the run takes, and of how many examples."""

    micro_batches: int
    """Micro-batches per optimizer step, over every process."""
    step_size: int
    """Examples per optimizer step, over every process."""
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


@dataclass
class LogWindow:
    """Loss sums, counts and input tokens since the last metrics line."""

    sums: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)
    inputs: int = 0
    started: float = field(default_factory=time.perf_counter)


def run(
    recipe: schema.Recipe,
    recipe_path: str | Path,
    resume: bool = False,
    overwrite: bool = False,
) -> RunResult:
    """Train the recipe's adapter (or whole model) into its run folder.

    Nothing in the folder is changed before the recipe, the folder and (on resume) the saved
    state are checked. With `overwrite` the old run is set aside, and put back if the new run
    fails to start. Raises Interrupted on a stop signal, after saving a checkpoint.
    """
    training = TrainingRun(recipe, config.run_dir(recipe, recipe_path))
    training.start(resume, overwrite)
    return training.train()


def check_run_dir(
    run_dir: Path, recipe: schema.Recipe, resume: bool, overwrite: bool
) -> schema.Recipe | None:
    """Refuse to clobber a run, or a folder that is not one, unless told to; change nothing.

    On resume, returns the recipe the run started with."""
    if resume and overwrite:
        raise TrainError(
            f"--resume continues the run in {run_dir} and --overwrite replaces it: choose one"
        )
    run_folder.check_ours(run_dir)
    if overwrite:
        # Whatever the folder's run holds, damaged files included, is being replaced.
        return None
    summary_path = run_dir / run_folder.SUMMARY
    status = read_json(summary_path).get("status") if summary_path.is_file() else None
    has_checkpoint = checkpoint.latest(run_dir) is not None
    if not resume and status == "finished":
        raise TrainError(f"{run_dir} holds a finished run; use --overwrite to replace it")
    if not resume and (has_checkpoint or status is not None):
        raise TrainError(
            f"{run_dir} holds an unfinished run; continue it with "
            f"`llama-tune train {run_dir} --resume`, or replace it with --overwrite"
        )
    if resume and status == "finished":
        raise TrainError(f"{run_dir} holds a finished run; use --overwrite to train again")
    if resume and not has_checkpoint and status is None and not run_folder.is_run_folder(run_dir):
        raise TrainError(f"{run_dir} holds no run to resume; drop --resume to start one")
    if resume and not has_checkpoint:
        raise TrainError(
            f"{run_dir} has no complete checkpoint to resume from; use --overwrite to start again"
        )
    return check_resumable(run_dir, recipe) if resume else None


def check_resumable(run_dir: Path, recipe: schema.Recipe) -> schema.Recipe:
    """Stop when the recipe changed in a way the saved state cannot follow; returns the recipe
    the run started with."""
    saved = config.load_run(run_dir)
    changed = checkpoint.changed_resume_keys(saved, recipe)
    if changed:
        raise TrainError(
            f"cannot resume {run_dir}: the recipe changed {', '.join(changed)} "
            f"(see {run_dir / run_folder.RECIPE_COPY}); use --overwrite to start again"
        )
    return saved


@contextmanager
def together(accelerator: Accelerator) -> Iterator[None]:
    """Run a set-up phase on every process, then stop them all if any of them failed.

    A process that stopped alone (a data file missing on one machine) would leave the others
    waiting in their next collective, under NCCL for as long as its timeout. Each process holds
    its error until every process has finished the phase; the failed ones raise their own, the
    others a TrainError pointing at it. One process needs no agreement.
    """
    error = None
    try:
        yield
    except Exception as caught:  # held, then raised below once every process knows
        error = caught
        if accelerator.num_processes > 1:
            # Said at once: were the others stuck in a collective of this phase, they would be
            # stopped by the launcher before they could say why.
            print(
                f"process {accelerator.process_index} failed while setting up: {error}",
                file=sys.stderr,
                flush=True,
            )
    if accelerator.num_processes > 1:
        wait = agreement.FAILED_PROCESS_WAITS if error else PROCESS_GROUP_TIMEOUT
        failed = agreement.count_failures(error is not None, accelerator.num_processes, wait)
        if failed is None and error is None:
            raise TrainError(f"stopped: the other processes did not finish setting up in {wait}")
        if failed is None:
            print(
                f"process {accelerator.process_index}: the others are waiting for it in a "
                "collective; stopping them",
                file=sys.stderr,
                flush=True,
            )
        elif error is None and failed:
            raise TrainError(
                f"stopped: {failed} other process(es) failed while setting up (see their error)"
            )
    if error is not None:
        raise error


def check_evaluation_splits(
    recipe: schema.Recipe, validation: data.Split | None, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Stop at the start, not after training, when the recipe evaluates on rows the data does
    not have: validation settings without validation rows, or an after-training split the
    source lacks."""
    settings = recipe.validation
    asked = {
        "validation.every": settings.every,
        "validation.metric_rows": settings.metric_rows,
        "validation.best_metric": settings.best_metric,
    }
    keys = [key for key, value in asked.items() if value is not None]
    if keys and (validation is None or not validation.examples):
        found = "no validation split" if validation is None else "no usable validation rows"
        raise TrainError(
            f"{', '.join(keys)}: data source {recipe.data.source} has {found}; name one with "
            "data.splits.validation or hold rows out with data.splits.validation_fraction"
        )
    if not recipe.evaluation.after_training:
        return
    split = recipe.evaluation.split
    if data.open_scored_split(recipe.data, split, recipe.train.seed) is None:
        raise TrainError(
            f"evaluation.after_training: data source {recipe.data.source} has no {split!r} "
            "split to score; set evaluation.split"
        )
    # Read as evaluation will read it: hidden labels and unusable rows are named now.
    eval_set = scoring.load_eval_set(recipe, tokenizer, split, recipe.evaluation.max_rows)
    problem = scoring.unscorable(eval_set)
    if problem is not None:
        raise TrainError(f"evaluation.after_training: {problem}; set evaluation.split")


def check_folder_is_shared(run_dir: Path, accelerator: Accelerator) -> None:
    """Stop a launch whose processes do not all see the run folder. The main process writes it
    alone and every process reads it back (a checkpoint to resume, the teacher cache, the
    trained weights to evaluate): machines with disks of their own would fail there, one of
    them alone, with the others waiting in a collective."""
    if accelerator.num_processes == 1:
        return
    token = [secrets.token_hex(8) if accelerator.is_main_process else None]
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / f".shared-{token[0]}").touch()
    marker = run_dir / f".shared-{broadcast_object_list(token)[0]}"
    # A network file system may show a new file to other machines a moment late.
    deadline = time.monotonic() + 5
    while not (seen := marker.exists()) and time.monotonic() < deadline:
        time.sleep(0.5)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker.unlink()
    if not seen:
        raise TrainError(
            f"{run_dir}: process {accelerator.process_index} (on {socket.gethostname()}) does "
            "not see the run folder the main process made: output.dir must be on a file "
            "system every machine of the run shares"
        )


class TrainingRun:
    """One run of a recipe: `start` (the named set-up steps), then `train`."""

    def __init__(self, recipe: schema.Recipe, run_dir: Path) -> None:
        self.recipe = recipe
        self.settings = recipe.train
        self.run_dir = run_dir
        self.metrics_path = run_dir / run_folder.METRICS
        self.summary_path = run_dir / run_folder.SUMMARY
        check_launch()
        mixed_precision = resolve_precision(self.settings.precision)
        # Replicated (one process, DDP), FSDP or DeepSpeed ZeRO, as the launch asks.
        self.layout = assembly.layout_for_launch(recipe, mixed_precision)
        self.accelerator = self.layout.accelerator(
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=self.settings.grad_accumulation,
            log_with=list(recipe.logging.trackers) or None,
            project_dir=run_dir,
        )

    # ------------------------------------------------------------------------------- set-up

    def start(self, resume: bool, overwrite: bool) -> None:
        """Check the run folder, then set up; a failed set-up leaves the folder as it was."""
        main = self.accelerator.is_main_process
        existed = self.run_dir.exists()
        replaced = None
        # The recipe a resumed run started with (main process): its changes are printed.
        self.started_with = None
        with together(self.accelerator):
            if main:
                self.started_with = check_run_dir(self.run_dir, self.recipe, resume, overwrite)
                if overwrite:
                    replaced = run_folder.set_aside(self.run_dir)
        try:
            self._setup(resume)
        except BaseException:
            if main and replaced is not None:
                run_folder.put_back(self.run_dir, replaced)
            elif main and not existed:
                run_folder.remove_failed_start(self.run_dir)
            raise
        if replaced is not None:
            run_folder.discard(replaced)

    def _setup(self, resume: bool) -> None:
        set_seed(self.settings.seed)
        with together(self.accelerator):
            check_folder_is_shared(self.run_dir, self.accelerator)
        with together(self.accelerator):
            self.built = assembly.build(
                self.recipe,
                self.accelerator,
                self.run_dir,
                self.layout,
            )
            self.objective = self.built.objective
            self.tokenizer = self.built.bundle.tokenizer
            self.train_split = self.built.datasets.train
            self.validation = self.built.datasets.validation
            self.data_hash = data.fingerprint(self.train_split.examples)
            check_evaluation_splits(self.recipe, self.validation, self.tokenizer)
            self.plan = self._setup_plan()
        # Saved weights go into the model before it is spread out; the optimizer's state after.
        with together(self.accelerator):
            saved = self._read_checkpoint() if resume else None
        self._setup_optimizer()
        self.state = self._start_fresh() if saved is None else self._resume(saved)
        self._print_data()
        self._setup_summary(resume)

    def _setup_plan(self) -> StepPlan:
        settings = self.settings
        self.lengths = [len(example.input_ids) for example in self.train_split.examples]
        micro_batches = settings.grad_accumulation * self.accelerator.num_processes
        step_size = settings.batch_size * micro_batches
        steps_per_epoch = len(self.lengths) // step_size
        if steps_per_epoch == 0:
            raise TrainError(
                f"{self.train_split.stats.origin}: {len(self.lengths)} usable rows, fewer than "
                f"one step of {step_size} (train.batch_size x train.grad_accumulation x processes)"
            )
        total_steps = settings.max_steps or math.ceil(settings.epochs * steps_per_epoch)
        warmup = settings.warmup_steps
        if warmup is None:
            warmup = round(settings.warmup_ratio * total_steps)
        elif warmup >= total_steps and self.accelerator.is_main_process:
            # Allowed for a short trial of a real recipe, but never what a run should do.
            print(
                f"note: train.warmup_steps {warmup} >= the run's {total_steps} steps: the "
                "learning rate never reaches train.lr",
                file=sys.stderr,
            )
        return StepPlan(micro_batches, step_size, steps_per_epoch, total_steps, warmup)

    def _setup_optimizer(self) -> None:
        settings, accelerator = self.settings, self.accelerator
        self.layout.place(accelerator, self.objective, self.built.bundle.model)
        if self.built.augmenter is not None:
            self.built.augmenter.share_tables(
                lambda tensor: self.layout.main_copy(tensor, accelerator)
            )
        # Collected after placing, which may replace the parameters (FSDP).
        self.trainable = trained_parameters(self.objective)
        optimizer = adamw(self.trainable, settings.lr, settings.weight_decay)
        self.scheduler = get_scheduler(
            settings.scheduler,
            optimizer,
            num_warmup_steps=self.plan.warmup_steps,
            num_training_steps=self.plan.total_steps,
        )
        # The scheduler is stepped by hand once per optimizer step, so it is not prepared: a
        # prepared scheduler steps once per process.
        self.loss_module, self.optimizer = self.layout.prepare(
            accelerator, self.objective, optimizer
        )

    def _start_fresh(self) -> TrainState:
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / run_folder.RECIPE_COPY).write_text(config.to_yaml(self.recipe))
            self.metrics_path.write_text("")
        return TrainState(
            recipe_hash=checkpoint.recipe_hash(self.recipe),
            data_hash=self.data_hash,
            processes=self.accelerator.num_processes,
        )

    def _read_checkpoint(self) -> checkpoint.SavedCheckpoint:
        """Read the newest intact checkpoint (a damaged one is named and the next tried) and
        put its trained weights into the model."""
        full_model = self.recipe.adapter is None
        extras = trained_extras(self.objective, self.built.bundle.model)
        for folder in reversed(checkpoint.complete_checkpoints(self.run_dir)):
            try:
                saved = checkpoint.read(folder, full_model, extras=bool(extras))
            except checkpoint.CheckpointError as error:
                self.accelerator.print(f"skipping a damaged checkpoint: {error}")
                continue
            processes = self.accelerator.num_processes
            if saved.state.processes not in (0, processes):
                raise TrainError(
                    f"{folder} was saved by a run of {saved.state.processes} processes and this "
                    f"launch has {processes}: a step's rows (train.batch_size x "
                    "train.grad_accumulation x processes) and random states are dealt among "
                    f"them; resume with {saved.state.processes} processes"
                )
            if saved.state.data_hash not in ("", self.data_hash):
                raise TrainError(
                    f"cannot resume {self.run_dir}: the training rows changed since it started "
                    f"({self.train_split.stats.origin}); the steps ahead would not be the run's. "
                    "Restore the data, or use --overwrite to start again"
                )
            if saved.state.step >= self.plan.total_steps:
                raise TrainError(
                    f"{self.run_dir} has trained {saved.state.step} steps and the recipe plans "
                    f"{self.plan.total_steps} (train.max_steps, train.epochs): nothing is left "
                    "to train; raise train.max_steps to train on"
                )
            self.layout.restore_weights(saved, self.built.bundle.model, extras)
            return saved
        raise TrainError(f"{self.run_dir}: no intact checkpoint to resume from")

    def _resume(self, saved: checkpoint.SavedCheckpoint) -> TrainState:
        """Go on from a read checkpoint: loss scale, optimizer, scheduler, this process's RNGs."""
        self.layout.load_loss_scale(self.accelerator, self.optimizer, saved.state.loss_scale)
        self.layout.load_optimizer(self.objective, self.optimizer, saved.optimizer)
        self.scheduler.load_state_dict(saved.scheduler)
        checkpoint.restore_rng_states(saved.process_rng_states, self.accelerator.process_index)
        self._follow_recipe_schedule()
        state = saved.state
        state.processes = self.accelerator.num_processes  # older checkpoints held none
        if self.accelerator.is_main_process:
            _trim_metrics(self.metrics_path, state.step)
            print(f"resuming from {saved.folder} (step {state.step})")
            assert self.started_with is not None
            self._print_changes(self.started_with)
        return state

    def _follow_recipe_schedule(self) -> None:
        """Give the restored optimizer the recipe's learning rate and weight decay, which may
        differ from those the run started with: the schedule goes on from the step reached."""
        scheduler = self.scheduler
        assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
        groups = self.optimizer.param_groups
        scheduler.base_lrs = [self.settings.lr for _ in groups]
        for group, factor in zip(groups, scheduler.lr_lambdas, strict=True):
            group["initial_lr"] = self.settings.lr
            group["lr"] = self.settings.lr * factor(scheduler.last_epoch)
            group["weight_decay"] = self.settings.weight_decay

    def _print_changes(self, started_with: schema.Recipe) -> None:
        changes = config.changed_keys(started_with, self.recipe)
        # The folder resumed is where the run is, however the recipe names it.
        changes.pop("output.dir", None)
        for key, (before, after) in changes.items():
            print(f"  changed since the run started: {key} {before} -> {after}")

    def _print_data(self) -> None:
        """Say how many rows each split used and why others were skipped."""
        if not self.accelerator.is_main_process:
            return
        settings = self.recipe.data
        splits = (
            ("train", self.train_split, settings.max_train_rows, "data.max_train_rows"),
            ("validation", self.validation, settings.max_eval_rows, "data.max_eval_rows"),
        )
        for name, split, asked, key in splits:
            if split is None:
                continue
            stats = split.stats
            used = f"{stats.rows_used} rows used, {stats.truncated} truncated"
            if asked is not None and stats.rows_used < asked:
                used += f" ({key} asked for {asked}: the file has no more usable rows)"
            print(data.describe_rows(name, stats.origin, used, stats.skipped, self.summary_path))
        # A mixed source's skipped rows (another label set, another format) would otherwise
        # show only in summary.json.
        drawn = Counter(example.source for example in self.train_split.examples)
        for index, stats in enumerate(self.built.datasets.mixed):
            used = f"{stats.rows_used} rows used, {stats.truncated} truncated, "
            used += f"{drawn[index + 1]} examples per epoch"
            key = f"data.mix.{index}"
            print(data.describe_rows(key, stats.origin, used, stats.skipped, self.summary_path))

    def _setup_summary(self, resume: bool) -> None:
        accelerator, model = self.accelerator, self.built.bundle.model
        summary = read_json(self.summary_path) if resume and self.summary_path.is_file() else {}
        trainable_count, total_count = models.parameter_counts(model)
        summary.update(
            status="running",
            run_dir=str(self.run_dir),
            model=self.recipe.model.name,
            base_model=models.base_record(self.recipe.model),
            precision=accelerator.mixed_precision,
            device=device_name(accelerator.device),
            processes=accelerator.num_processes,
            layout=self.layout.name,
            packed=self.recipe.packed,
            parameters={"trainable": trainable_count, "total": total_count},
            data=self.built.datasets.summary(),
            total_steps=self.plan.total_steps,
            steps_per_epoch=self.plan.steps_per_epoch,
            versions=library_versions(),
        )
        self.summary = summary
        self.probe = None
        if self.recipe.validation.metric_rows is not None:
            self.probe = validation.MetricProbe.load(
                self.recipe, self.tokenizer, accelerator.mixed_precision
            )
        if self.has_validation and "eval_loss_before" not in summary:
            summary["eval_loss_before"] = self._evaluate(0)["eval_loss"]
        if accelerator.is_main_process:
            write_json(self.summary_path, summary)
        if self.recipe.logging.trackers:
            tracked = {
                key: value if isinstance(value, int | float | str | bool) else str(value)
                for key, value in config.flatten(self.recipe).items()
            }
            accelerator.init_trackers(self.run_dir.name, config=tracked)

    @property
    def has_validation(self) -> bool:
        return self.validation is not None and bool(self.validation.examples)

    # ---------------------------------------------------------------------------- the loop

    def train(self) -> RunResult:
        """Run the planned steps, epoch after epoch, then save the trained weights."""
        state, plan = self.state, self.plan
        self.loss_module.train()
        self.progress = tqdm(
            total=plan.total_steps,
            initial=state.step,
            disable=not self.accelerator.is_main_process,
            desc="train",
            dynamic_ncols=True,
        )
        self.window = LogWindow()
        self.train_seconds = self.summary.get("train_seconds", 0.0)
        self.input_tokens = self.summary.get("input_tokens", 0)
        with StopSignals() as signals:
            while state.step < plan.total_steps:
                order = torch.Generator().manual_seed(self.settings.seed + state.epoch)
                epoch_plan = data.plan_epoch(
                    self.lengths, plan.step_size, order, not self.recipe.packed
                )
                for step_examples in epoch_plan[state.step_in_epoch :]:
                    if state.step >= plan.total_steps:
                        break
                    self._optimizer_step(step_examples)
                    self._log(len(epoch_plan))
                    self._evaluate_if_due()
                    self._checkpoint_if_due(signals)
                else:
                    state.epoch += 1
                    state.step_in_epoch = 0
        self.progress.close()
        return self._finish()

    def _model_calls(self) -> ModelCalls:
        """How the step may call the model outside the objective's forward (on-policy
        generation, the gradient attack): in step with the other processes where the weights
        are spread over them."""
        accelerator, objective, layout = self.accelerator, self.objective, self.layout
        return ModelCalls(
            whole=lambda: layout.whole_model(objective),
            synced=layout.spreads_weights,
            most=lambda count: (
                most_of_processes(accelerator, count) if layout.spreads_weights else count
            ),
            regather=lambda: layout.regather(objective),
        )

    def _optimizer_step(self, step_examples: list[int]) -> None:
        """One optimizer step over the step's examples, split into micro-batches."""
        accelerator, objective, state = self.accelerator, self.objective, self.state
        started = time.perf_counter()
        terms = list(objective.weights)
        batches = data.micro_batches(
            step_examples, self.lengths, self.plan.micro_batches, self.recipe.packed
        )
        own = batches[accelerator.process_index :: accelerator.num_processes]
        examples = self.train_split.examples
        counts = step_counts(objective, [examples[i] for i in step_examples])
        step_inputs = sum(self.lengths[i] for i in step_examples)
        own_examples = [[examples[i] for i in indices] for indices in own]
        calls = self._model_calls()
        rewritten = objective.rewrite_step(state.step, own_examples, calls)
        if rewritten is not None:
            own_examples = rewritten
        if self.built.augmenter is not None:
            augmenter = self.built.augmenter
            own, own_examples = augmenter.training_batches(state.step, own, own_examples, calls)
        if rewritten is not None or self.built.augmenter is not None:
            # Other examples than planned: new counts, summed over every process's
            # micro-batches. An on-policy step (the student's own completions) scores no
            # reference answer.
            mine = [example for batch in own_examples for example in batch]
            counts, step_inputs = _reduced_counts(
                accelerator, objective, terms, mine, reference_answers=rewritten is None
            )
        step_sums = self._forward_backward(own, own_examples, counts, terms)
        # Terms counted over no position this step (task CE on an on-policy step) are left out
        # of the loss and the logs.
        term_sums = {
            name: value for name, value in zip(terms, step_sums, strict=True) if counts[name] > 0
        }
        loss_value = combined(objective, term_sums, counts)
        self.grad_norm = None
        if math.isfinite(loss_value):
            if self.settings.max_grad_norm is not None:
                norm = accelerator.clip_grad_norm_(self.trainable, self.settings.max_grad_norm)
                # DeepSpeed's engine clipped inside the last backward and gives its norm;
                # under FSDP the norm is a sharded tensor.
                if isinstance(norm, DTensor):
                    norm = norm.full_tensor()
                self.grad_norm = None if norm is None else float(norm)
            self.optimizer.step()
            self.scheduler.step()
        else:
            self._skip_nonfinite(loss_value)
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.step_in_epoch += 1
        state.tokens += counts["ce"]
        self.input_tokens += step_inputs
        self.train_seconds += time.perf_counter() - started
        self.window.inputs += step_inputs
        if math.isfinite(loss_value):
            self.window.sums.update(term_sums)
            self.window.counts.update(counts)
        self.progress.update(1)

    def _forward_backward(
        self,
        own: list[list[int]],
        own_examples: list[list[data.Example]],
        counts: Counter[str],
        terms: list[str],
    ) -> list[float]:
        """Forward and backward of this process's micro-batches; each term's sum over the step
        and every process."""
        accelerator, settings = self.accelerator, self.settings
        step_sums = torch.zeros(len(terms), device=accelerator.device)
        for indices, examples in zip(own, own_examples, strict=True):
            if self.recipe.packed:
                batch = data.collate_packed(
                    examples, self.tokenizer.pad_token_id, settings.length_bucket
                )
            else:
                batch = data.collate(examples, self.tokenizer.pad_token_id, settings.length_bucket)
            batch |= self.objective.extra_inputs(indices)
            batch = {name: value.to(accelerator.device) for name, value in batch.items()}
            with accelerator.accumulate(self.loss_module):
                sums = self.loss_module(**batch)
                # Accelerate divides each backward by grad_accumulation and DDP averages over
                # processes; scaling by both makes the step's gradient that of the weighted
                # per-term means over the whole step.
                loss = combined(self.objective, sums, counts) * self.plan.micro_batches
                accelerator.backward(_nan_gradients_if_nonfinite(loss))
            step_sums += torch.stack([sums[name].detach().float() for name in terms])
        # .tolist() syncs with the device once per step.
        return accelerator.reduce(step_sums, reduction="sum").tolist()

    def _skip_nonfinite(self, loss_value: float) -> None:
        self.state.nonfinite_steps += 1
        if self.state.nonfinite_steps > self.settings.max_nonfinite_steps:
            raise TrainError(
                f"non-finite loss ({loss_value}) at step {self.state.step + 1}; lower train.lr, "
                "use fp32, or allow skips with train.max_nonfinite_steps"
            )
        self.accelerator.print(f"skipping step {self.state.step + 1}: loss is {loss_value}")

    def _log(self, steps_in_epoch: int) -> None:
        """A metrics line every `logging.every` steps and at the last one."""
        state, window = self.state, self.window
        if state.step % self.recipe.logging.every and state.step != self.plan.total_steps:
            return
        elapsed = time.perf_counter() - window.started
        record = {
            "step": state.step,
            "epoch": state.epoch + state.step_in_epoch / steps_in_epoch,
            "loss": combined(self.objective, window.sums, window.counts),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": self.grad_norm,
            "tokens": window.inputs,
            "seconds": elapsed,
            "tokens_per_s": window.inputs / elapsed if elapsed > 0 else None,
        }
        if len(self.objective.weights) > 1:
            # Each term's own mean, unweighted: task CE and distillation apart.
            for name in self.objective.weights:
                if window.counts[name] > 0:
                    record[f"{name}_loss"] = window.sums[name] / window.counts[name]
        self.summary.setdefault("train_loss_first", record["loss"])
        self.summary["train_loss_last"] = record["loss"]
        self.progress.set_postfix(
            loss=f"{record['loss']:.4f}",
            lr=f"{record['lr']:.2e}",
            tok_s=f"{record['tokens_per_s'] or 0:.0f}",
        )
        if self.accelerator.is_main_process:
            _write_metrics(self.metrics_path, record)
        self.accelerator.log(record, step=state.step)
        self.window = LogWindow()

    def _evaluate_if_due(self) -> None:
        step, settings = self.state.step, self.recipe.validation
        due = step == self.plan.total_steps or (settings.every and step % settings.every == 0)
        if not (self.has_validation and due):
            return
        record = self._evaluate(step)
        self.summary["eval_loss_after"] = record["eval_loss"]
        # Every process has the metrics; a spread-out model needs them all to gather its weights.
        if settings.best_metric and (self.layout.gathers or self.accelerator.is_main_process):
            self._keep_if_best(settings.best_metric, record)
        self.window.started = time.perf_counter()

    def _evaluate(self, step: int) -> dict[str, Any]:
        """Eval loss and task metrics at `step` (every process takes part), logged."""
        assert self.validation is not None
        losses = eval_losses(
            self.loss_module,
            self.objective,
            self.validation,
            self.accelerator,
            self.settings.batch_size,
            self.tokenizer.pad_token_id,
            self.settings.length_bucket,
        )
        record = {"step": step, **losses}
        if self.probe is not None:
            model = self.accelerator.unwrap_model(self.loss_module).model
            with self.layout.whole_model(self.objective):
                record |= self.probe.score(model, synced=self.layout.spreads_weights)
            self.loss_module.train()
        if self.accelerator.is_main_process:
            _write_metrics(self.metrics_path, record)
        self.accelerator.log(record, step=step)
        return record

    def _keep_if_best(self, metric: str, record: dict[str, Any]) -> None:
        """Save the adapter to best/ when this eval beats every earlier one on `metric`."""
        state = self.state
        value = record[metric if metric == validation.EVAL_LOSS else f"eval_{metric}"]
        if validation.is_better(metric, value, state.best_value):
            weights, _ = self._gathered_weights()
            if self.accelerator.is_main_process:
                model = self.accelerator.unwrap_model(self.loss_module).model
                validation.save_best(
                    self.run_dir, model, self.tokenizer, state.step, metric, value, weights
                )
            state.best_step, state.best_value = state.step, value

    def _gathered_weights(
        self,
    ) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
        """The trained weights to save (None: the model saves its own) and the extras. When
        the layout gathers, every process must call it, and the main process gets them."""
        return self.layout.gathered_weights(
            self.objective, self.built.bundle.model, trained_only=self.recipe.adapter is not None
        )

    def _checkpoint_if_due(self, signals: StopSignals) -> None:
        """Save every `checkpoint.every` steps, and on a stop signal (then stop)."""
        state, accelerator = self.state, self.accelerator
        every = self.recipe.checkpoint.every
        save_due = every and state.step % every == 0
        stop = _any_process(accelerator, signals.requested is not None)
        if not (save_due or stop) or state.step >= self.plan.total_steps:
            return
        state.loss_scale = self.layout.loss_scale(accelerator, self.optimizer)
        self.summary.update(
            status="interrupted" if stop else "running",
            train_seconds=self.train_seconds,
            input_tokens=self.input_tokens,
            state=asdict(state),
        )
        # Every process's RNG states, gathered onto the main process that writes them.
        process_rng_states = gather_object([checkpoint.rng_states()])
        weights, extras = self._gathered_weights()
        optimizer_state = self.layout.optimizer_state(self.objective, self.optimizer)
        saved = self.run_dir / run_folder.CHECKPOINTS
        if accelerator.is_main_process:
            saved = checkpoint.save(
                self.run_dir,
                checkpoint.Trained(self.built.bundle.model, weights, extras, optimizer_state),
                self.scheduler,
                state,
                self.recipe.checkpoint.keep_last,
                process_rng_states,
            )
            write_json(self.summary_path, self.summary)
        accelerator.wait_for_everyone()
        if stop:
            self.progress.close()
            raise Interrupted(signals.exit_code, self.run_dir, saved)

    def _finish(self) -> RunResult:
        """Save the trained weights and the final summary."""
        accelerator, state, summary = self.accelerator, self.state, self.summary
        weights_dir = run_folder.weights_folder(self.run_dir, self.recipe.adapter is None)
        accelerator.wait_for_everyone()
        weights, _ = self._gathered_weights()
        # The most any process's GPU held (None on a CPU, on every process alike): what each
        # GPU needs room for, which a process with longer rows than the main one may set.
        peak = peak_memory_gib(accelerator.device)
        if peak is not None:
            peak = float(accelerator.reduce(torch.tensor(peak, device=accelerator.device), "max"))
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(self.loss_module).model
            model.save_pretrained(weights_dir, state_dict=weights)
            self.tokenizer.save_pretrained(weights_dir)
            summary.update(
                status="finished",
                steps=state.step,
                epochs=state.epoch + state.step_in_epoch / max(self.plan.steps_per_epoch, 1),
                nonfinite_steps=state.nonfinite_steps,
                target_tokens=state.tokens,
                input_tokens=self.input_tokens,
                train_seconds=self.train_seconds,
                tokens_per_s=self.input_tokens / self.train_seconds if self.train_seconds else None,
                peak_memory_gib=peak,
                weights=str(weights_dir),
                best=validation.best_record(self.run_dir),
            )
            write_json(self.summary_path, summary)
        # The others go on to read the run folder (after-training evaluation): not before the
        # main process has written it.
        accelerator.wait_for_everyone()
        # Not end_training(): it would end the process group that after-training evaluation
        # shares its rows over; the CLI ends it (runtime.end_processes).
        for tracker in accelerator.trackers:
            tracker.finish()
        return RunResult(run_dir=self.run_dir, weights_dir=weights_dir, summary=summary)


def _trim_metrics(path: Path, after_step: int) -> None:
    """Drop metric lines past the checkpoint being resumed; they will be written again."""
    if not path.is_file():
        return
    text = path.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and not text.endswith("\n"):
        # A crash mid-write leaves the last line partial; it was past the checkpoint anyway.
        lines.pop()
    kept = [line for line in lines if json.loads(line)["step"] <= after_step]
    path.write_text("".join(f"{line}\n" for line in kept))


def _write_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _reduced_counts(
    accelerator: Accelerator,
    objective: Objective,
    terms: list[str],
    examples: list[data.Example],
    reference_answers: bool,
) -> tuple[Counter[str], int]:
    """Term counts and input tokens of rewritten examples, summed over processes.

    Without `reference_answers` (on-policy completions) the terms that score the data's answers
    count nothing: the step replaced those answers.
    """
    counts = step_counts(objective, examples, reference_answers)
    local = [counts[name] for name in terms] + [sum(len(e.input_ids) for e in examples)]
    totals = accelerator.reduce(torch.tensor(local, device=accelerator.device), reduction="sum")
    *term_totals, inputs = (int(value) for value in totals.tolist())
    return Counter(dict(zip(terms, term_totals, strict=True))), inputs


@torch.no_grad()
def eval_losses(
    loss_module: torch.nn.Module,
    objective: Objective,
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
    own = batches[accelerator.process_index :: accelerator.num_processes]
    # Every process runs as many forwards as the busiest: a sharded model gathers its weights
    # in each forward with every process, so one left out would keep the others waiting. The
    # extra forwards repeat a batch and count nothing.
    rounds = -(-len(batches) // accelerator.num_processes)
    for position in range(rounds):
        batch = own[position] if position < len(own) else batches[0]
        tensors = data.collate(batch, pad_token_id, bucket)
        tensors = {name: value.to(accelerator.device) for name, value in tensors.items()}
        sums = loss_module(**tensors)
        if position >= len(own):
            continue
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


def _nan_gradients_if_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """`loss`, or a loss whose gradients are all NaN when it is not finite (an infinite loss
    can have finite gradients). A non-finite step is skipped: DeepSpeed's engine steps inside
    the last backward and skips only a step whose gradients overflow. No host sync."""
    return loss * torch.where(torch.isfinite(loss.detach()), 1.0, math.nan)


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process when it is true on any: all must stop at the same step."""
    if accelerator.num_processes == 1:
        return flag
    # One tiny all-reduce per step; without it a signal seen by one rank would deadlock the rest.
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device)).item())
