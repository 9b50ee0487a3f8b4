"""The recipe schema: small pydantic models, one per concern, none over 15 keys.

Every section forbids unknown keys and documents each field in the docstring below it. Fields a
checkpoint depends on carry `RESUME` metadata, so the list of keys that refuse `--resume` is
read from the schema itself (`resume_keys`) and cannot drift from it. Reading a recipe file,
overrides and error reporting live in `config`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llama_tune.tasks import TASKS, template_problems


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, not silently ignored, and an
    empty string names nothing (a model, a folder, a split): where the key may be null it means
    null (`revision: ${REV:-}`), elsewhere it is an error."""

    model_config = ConfigDict(
        extra="forbid",
        validate_default=True,
        use_attribute_docstrings=True,
        allow_inf_nan=False,
        str_min_length=1,
    )
    KEEPS_EMPTY: ClassVar[frozenset[str]] = frozenset()
    """Keys where an empty string is a value of its own."""

    @model_validator(mode="before")
    @classmethod
    def _empty_means_null(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        return {
            key: None if value == "" and _nullable(cls, key) else value
            for key, value in values.items()
        }


def _nullable(section: type[Section], key: str) -> bool:
    """Whether `key` of `section` may be null (and does not keep an empty string as such)."""
    field = section.model_fields.get(key)
    if field is None or key in section.KEEPS_EMPTY:
        return False
    return type(None) in get_args(field.annotation)


RESUME = {"resume": "fixed"}
"""Field metadata: a checkpoint depends on this key, so changing it refuses `--resume` (another
model or adapter shape, another data order, other perturbed copies)."""


class ModelConfig(Section):
    """Which model to adapt and how to hold its weights."""

    name: str = Field("smollm2-135m-instruct", json_schema_extra=RESUME)
    """A built-in name, a local folder, or a Hugging Face Hub id."""
    revision: str | None = Field(None, json_schema_extra=RESUME)
    """Hub revision (branch, tag or commit) when `name` is a Hub id."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", json_schema_extra=RESUME
    )
    """Storage dtype of the frozen base weights; auto follows the compute precision."""
    quantization: Literal["none", "4bit", "8bit"] = Field("none", json_schema_extra=RESUME)
    """bitsandbytes quantisation of the frozen base: 4bit is NF4 (QLoRA)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, about 30% slower."""
    compile: bool = False
    """torch.compile each decoder layer for training: 1.35x faster SST-2 LoRA steps on a CPU
    after a compile of about half a minute (seconds once torch's cache holds it)."""


class AdapterConfig(Section):
    """LoRA adapter settings (peft)."""

    r: int = Field(8, ge=1, le=1024, json_schema_extra=RESUME)
    """Rank of the low-rank update."""
    alpha: float = Field(16.0, gt=0, json_schema_extra=RESUME)
    """Scale numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter input; off by default (its random numbers cost ~1/3 of a CPU step)."""
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", json_schema_extra=RESUME
    )
    """Module names to adapt, or every linear layer except the output head."""
    layers: list[int] | None = Field(None, json_schema_extra=RESUME)
    """Adapt only these decoder layers (0: the lowest); null: all. The backward then stops at
    the lowest adapted layer: the top half of the layers trains ~1.4x faster a step."""
    use_dora: bool = Field(False, json_schema_extra=RESUME)
    """Weight-decomposed LoRA (DoRA)."""
    use_rslora: bool = Field(False, json_schema_extra=RESUME)
    """Rank-stabilised scaling alpha / sqrt(r)."""
    init_from: str | None = None
    """Start from a trained adapter's weights: a run folder, an adapter folder, or a Hub id
    (owner/name or owner/name@revision); its rank, scaling and modules must match."""

    @field_validator("target_modules")
    @classmethod
    def _targets_not_empty(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError("name at least one module, or use 'all-linear'")
        return value

    @field_validator("layers")
    @classmethod
    def _layers_named_once(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 0 or len(set(value)) < len(value)):
            raise ValueError("name each adapted layer once, from 0, or use null for all")
        return value


TaskName = Literal["classification", "summarisation", "translation", "instruction"]


class SplitsConfig(Section):
    """Names of the splits inside the data source; null turns a split off."""

    train: str = "train"
    """Split to train on."""
    validation: str | None = "validation"
    """Split for the eval loss; skipped when the source has none."""
    test: str | None = "test"
    """Split kept for final scoring."""
    validation_fraction: float | None = Field(None, gt=0.0, lt=0.5)
    """When the source has no validation split: hold out this share of the training rows
    (chosen with train.seed) as one."""

    @model_validator(mode="after")
    def _fraction_needs_validation(self) -> SplitsConfig:
        if self.validation_fraction is not None and self.validation is None:
            raise ValueError("validation_fraction: holds rows out for splits.validation, not null")
        return self


class HubSource(Section):
    """A Hugging Face Hub dataset with its configuration, revision or files."""

    hub: str
    """The dataset id (owner/name), or a local folder laid out as the Hub serves it."""
    config: str | None = None
    """Configuration name, e.g. sst2 of nyu-mll/glue."""
    revision: str | None = None
    """Branch, tag or commit."""
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    """Files to read instead of the configuration's, optionally by split."""

    def __str__(self) -> str:
        named = self.hub + (f"/{self.config}" if self.config else "")
        return named + (f"@{self.revision}" if self.revision else "")


RowFormat = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"]


class ChatConfig(Section):
    """How conversations are rendered, and which turns the loss covers."""

    template: str | None = Field(None, json_schema_extra=RESUME)
    """Chat template: 'tokenizer' (its own), a named one (llama-3, chatml, mistral, gemma,
    zephyr), a .jinja file or an inline Jinja string. Null: the tokenizer's own for
    conversations (messages, ShareGPT, alpaca), none for other rows."""
    KEEPS_EMPTY = frozenset({"system_prompt"})

    system_prompt: str | None = Field(None, min_length=0, json_schema_extra=RESUME)
    """A system turn put first in every conversation that has none of its own ("" gives an
    empty one, which keeps some chat templates from adding their default)."""
    assistant_turns: Literal["all", "last"] = Field("all", json_schema_extra=RESUME)
    """Which assistant turns of a conversation the loss covers: every one, or the last."""


class LanguagesConfig(Section):
    """Translation: the languages, when the rows do not name them."""

    source: str | None = Field(None, json_schema_extra=RESUME)
    """Source language name or code (en -> English); read from the rows when null."""
    target: str | None = Field(None, json_schema_extra=RESUME)
    """Target language name or code; read from the rows when null."""


class MixedSource(Section):
    """Another source of training rows, mixed in at a share of every epoch's examples."""

    source: str | HubSource = Field(json_schema_extra=RESUME)
    """A folder, a file, a Hub id or {hub: ID, ...}, as data.source."""
    weight: float = Field(gt=0.0, lt=1.0, json_schema_extra=RESUME)
    """Share of every epoch's training examples drawn from this source."""
    split: str = Field("train", json_schema_extra=RESUME)
    """The split its rows come from."""
    format: RowFormat = Field("auto", json_schema_extra=RESUME)
    """Instruction rows: their format, as data.format."""
    fields: dict[str, str] = Field({}, json_schema_extra=RESUME)
    """Task field -> column name in this source, as data.fields."""


class DataConfig(Section):
    """Where rows come from and how they become prompt and target text."""

    source: str | HubSource = Field(json_schema_extra=RESUME)
    """A folder of {train,validation,test}.jsonl|csv|parquet, a single file, a Hub dataset id,
    or {hub: ID, config, revision, data_files}."""
    task: TaskName = Field(json_schema_extra=RESUME)
    """Task template: classification, summarisation, translation or instruction."""
    splits: SplitsConfig = Field(SplitsConfig(), json_schema_extra=RESUME)
    fields: dict[str, str] = Field({}, json_schema_extra=RESUME)
    """Task field -> column name in the data, e.g. {text: sentence}; defaults fit the task."""
    template: str | None = Field(None, json_schema_extra=RESUME)
    """Prompt template with {field} placeholders; the task's default when null."""
    format: RowFormat = Field("auto", json_schema_extra=RESUME)
    """Instruction rows: messages, sharegpt, alpaca, prompt_completion or text; auto reads it
    from the first usable row."""
    chat: ChatConfig = Field(ChatConfig(), json_schema_extra=RESUME)
    labels: list[str] | None = Field(None, json_schema_extra=RESUME)
    """Classification label set; collected from the training split when null."""
    languages: LanguagesConfig = Field(LanguagesConfig(), json_schema_extra=RESUME)
    mix: list[MixedSource] = Field([], json_schema_extra=RESUME)
    """Other sources of training rows, each at its weight's share of every epoch; the main
    source gives the rest, and the validation and test rows."""
    max_length: int = Field(512, ge=8, json_schema_extra=RESUME)
    """Longest prompt + target in tokens."""
    truncation: Literal["truncate", "drop", "error"] = Field("truncate", json_schema_extra=RESUME)
    """Over-long rows: shorten the input text, drop the row, or stop with an error."""
    bad_rows: Literal["skip", "error"] = Field("skip", json_schema_extra=RESUME)
    """Rows with missing, empty, mistyped or undecodable fields: count and skip, or stop."""
    max_train_rows: int | None = Field(None, ge=1, json_schema_extra=RESUME)
    """Use only the first N usable training rows."""
    max_eval_rows: int | None = Field(None, ge=1)
    """Use only the first N usable validation rows for the eval loss."""

    @model_validator(mode="after")
    def _fits_task(self) -> DataConfig:
        task = TASKS[self.task]
        problems = []
        allowed = ", ".join(sorted(task.fields))
        for key, fields in [("fields", self.fields)] + [
            (f"mix.{index}.fields", mixed.fields) for index, mixed in enumerate(self.mix)
        ]:
            unknown = sorted(set(fields) - task.fields)
            if unknown:
                problems.append(f"{key}: unknown task field(s) {unknown}; allowed: {allowed}")
        problems += self._mix_leaks()
        if sum(mixed.weight for mixed in self.mix) >= 1.0:
            problems.append("mix: the weights must leave the main source a share (sum below 1)")
        if self.template is not None:
            problems += [
                f"template: {problem}" for problem in template_problems(self.template, task)
            ]
        if self.labels is not None and self.task != "classification":
            problems.append("labels: only classification recipes take labels")
        formats = [self.format, *(mixed.format for mixed in self.mix)]
        if any(name != "auto" for name in formats) and self.task != "instruction":
            problems.append(
                f"format: {self.task} rows have the task's fields; only "
                "instruction recipes take a format"
            )
        plain = self.chat.template is None and self.task != "instruction"
        if self.chat.system_prompt is not None and plain:
            problems.append("chat.system_prompt: needs a chat.template to put it in")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _mix_leaks(self) -> list[str]:
        """Mixed sources that would train on the rows the main source validates or tests on."""
        scored = {self.splits.validation: "validation", self.splits.test: "test"}
        problems = []
        for index, mixed in enumerate(self.mix):
            if str(mixed.source) == str(self.source) and mixed.split in scored:
                problems.append(
                    f"mix.{index}.split: {mixed.split} holds the main source's "
                    f"{scored[mixed.split]} rows, which would be trained on and then scored"
                )
        return problems


MOVED_KEYS = {
    "data.chat_template": "data.chat.template",
    "data.source_lang": "data.languages.source",
    "data.target_lang": "data.languages.target",
    "train.log_steps": "logging.every",
    "train.trackers": "logging.trackers",
    "train.eval_steps": "validation.every",
    "train.eval_metric_rows": "validation.metric_rows",
    "train.best_metric": "validation.best_metric",
    "train.save_steps": "checkpoint.every",
    "train.keep_last_checkpoints": "checkpoint.keep_last",
}
"""Keys that moved out of the `train` section, and where they live now."""


class TrainConfig(Section):
    """The optimisation loop: how many steps, of what size, at what learning rate."""

    epochs: float | None = Field(1.0, gt=0)
    """Passes over the training split; ignored when max_steps is set."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps to run; overrides epochs."""
    batch_size: int = Field(8, ge=1, json_schema_extra=RESUME)
    """Examples per micro-batch on each process."""
    grad_accumulation: int = Field(1, ge=1, json_schema_extra=RESUME)
    """Micro-batches per optimizer step."""
    lr: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warmup."""
    warmup_steps: int | None = Field(None, ge=0)
    """Linear warmup steps; overrides warmup_ratio."""
    warmup_ratio: float = Field(0.05, ge=0.0, le=1.0)
    """Warmup as a fraction of all steps."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW decoupled weight decay."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm; null turns clipping off."""
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    """Compute precision: autocast to bf16/fp16, or auto (fastest safe option here)."""
    seed: int = Field(42, json_schema_extra=RESUME)
    """Seeds adapter init, dropout and data order; runs with the same seed are identical."""
    max_nonfinite_steps: int = Field(0, ge=0)
    """Steps with a NaN/inf loss to skip before stopping with an error."""
    length_bucket: int = Field(16, ge=1)
    """Pad batches to a multiple of this many tokens (fewer distinct kernel shapes)."""
    packing: bool | None = Field(None, json_schema_extra=RESUME)
    """Lay each micro-batch's examples end to end in one row, without padding (attention stays
    inside each example), and draw each step's examples at random instead of by similar
    length; null: on for instruction data, off for the other tasks."""


class LoggingConfig(Section):
    """What training logs, and where, besides the progress bar."""

    every: int = Field(10, ge=1)
    """Write a metrics line every N steps (and at the last one)."""
    trackers: list[Literal["tensorboard", "wandb"]] = []
    """Accelerate trackers to log to, besides metrics.jsonl."""


class ValidationConfig(Section):
    """Evaluation on the validation split during training, and keeping the best weights."""

    every: int | None = Field(None, ge=1)
    """Eval loss on the validation split every N steps (and always before and after)."""
    metric_rows: int | None = Field(None, ge=1)
    """At every eval, also score the task's metrics on the first N validation rows."""
    best_metric: str | None = None
    """Keep the weights that score best on this metric in best/: eval_loss or a task metric."""


class CheckpointConfig(Section):
    """Resumable checkpoints of the training state."""

    every: int | None = Field(None, ge=1)
    """Checkpoint every N steps; null saves only on interruption."""
    keep_last: int = Field(2, ge=1)
    """How many step checkpoints to keep."""


AugmentMethod = Literal["char", "word", "neighbour", "gradient"]
AUGMENT_METHODS = get_args(AugmentMethod)
GradientCandidates = Literal["spelling", "misspellings", "neighbours"]


def _distinct_methods(methods: list[str]) -> list[str]:
    """Perturbation methods named at least once and none twice (augment and robustness)."""
    if not methods:
        raise ValueError(f"name at least one of {', '.join(AUGMENT_METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError("a method is named twice")
    return methods


class RobustnessConfig(Section):
    """Score the split again under perturbations of its inputs (the references unchanged)."""

    methods: list[AugmentMethod] = ["char", "gradient"]
    """Perturbation families (as in adversarial.augment); gradient attacks the model scored."""
    strengths: list[float] = [0.1, 0.2]
    """Budgets: the fraction of each input's words (char, word) or tokens changed."""
    neighbours: int = Field(10, ge=1)
    """Candidate substitutes per token for neighbour (and gradient with neighbours)."""
    gradient_candidates: GradientCandidates = "spelling"
    """Tokens the gradient attack may substitute (as in adversarial.augment)."""

    _methods = field_validator("methods")(_distinct_methods)

    @field_validator("strengths")
    @classmethod
    def _fractions(cls, strengths: list[float]) -> list[float]:
        if not strengths or any(not 0 < value <= 1 for value in strengths):
            raise ValueError("give one or more strengths, each above 0 and at most 1")
        return sorted(set(strengths))


class EvaluationConfig(Section):
    """How `llama-tune evaluate` scores the base model and the adapter."""

    split: str = "test"
    """Split to score: test, validation, or any split name of the source."""
    max_rows: int | None = Field(None, ge=1)
    """Score only the first N usable rows."""
    batch_size: int = Field(16, ge=1)
    """Prompts per forward pass."""
    max_new_tokens: int = Field(48, ge=1)
    """Generated answers (summarisation, translation, instruction): the longest."""
    num_beams: int = Field(1, ge=1)
    """Generated answers: 1 is greedy search."""
    length_normalise: bool = False
    """Classification: rank labels by mean instead of summed token log-probability."""
    bootstrap_resamples: int = Field(1000, ge=10)
    """Resamples for the 95% confidence intervals."""
    seed: int = 0
    """Seed of the bootstrap resampling."""
    after_training: bool = False
    """Score the split, adapter against base, when `llama-tune train` finishes."""
    adapter: Literal["final", "best"] = "final"
    """Which adapter of a run to score: the last one, or best/ (needs validation.best_metric)."""
    robustness: RobustnessConfig | None = None
    """Also score every system under input perturbations; null: clean inputs only."""


class OutputConfig(Section):
    """Where the run folder goes."""

    dir: str = "runs/{recipe}"
    """Run folder; {recipe} is the recipe file's name without extension."""


class TeacherConfig(ModelConfig):
    """The teacher: any model spec, optionally wearing a trained LoRA adapter."""

    name: str = Field(json_schema_extra=RESUME)
    """A built-in name, a local folder, or a Hugging Face Hub id; required: the student's
    default model is no teacher to assume."""
    adapter: str | None = None
    """The LoRA adapter the teacher wears (merged into it): a run folder, an adapter folder or a
    Hub id (owner/name or owner/name@revision)."""


class FromTeacherConfig(Section):
    """Which of the teacher's decoder layers a student built from it keeps."""

    every: int | None = Field(None, ge=1)
    """Keep layers 0, every, 2 x every, ... (2 halves the depth)."""
    keep_layers: list[int] | None = None
    """Keep exactly these layer indices, in this order."""

    @model_validator(mode="after")
    def _one_choice(self) -> FromTeacherConfig:
        if (self.every is None) == (self.keep_layers is None):
            raise ValueError("every: set either every or keep_layers")
        if self.keep_layers is not None and not self.keep_layers:
            raise ValueError("keep_layers: keep at least one layer")
        if self.keep_layers is not None and len(set(self.keep_layers)) < len(self.keep_layers):
            # A student holds each copied layer once: a repeated one left a layer unfilled.
            raise ValueError("keep_layers: name each kept layer once")
        return self


class StudentConfig(Section):
    """Where the student comes from."""

    from_teacher: FromTeacherConfig | None = None
    """Build the student from the teacher's embeddings, norms, head and some of its layers;
    null: the student is `model`."""


class TeacherCacheConfig(Section):
    """Offline distillation: the teacher's top-k distributions, computed once and stored."""

    top_k: int = Field(64, ge=1)
    """Log-probabilities kept per position; the rest of the mass is kept as one number."""
    examples_per_shard: int = Field(1000, ge=1)
    """Training examples per cache file; an interrupted build redoes at most one file."""


class HiddenStatesConfig(Section):
    """Hidden-state distillation: pull student layers towards teacher layers."""

    layers: dict[int, int] | None = None
    """Student layer -> teacher layer (0 is the embeddings, i the output of layer i); null:
    the layer each student layer was copied from, or evenly spaced teacher layers."""
    loss: Literal["mse", "cosine"] = "mse"
    """Distance per position: mean squared error, or 1 - cosine similarity."""
    weight: float = Field(1.0, ge=0.0)
    """Weight of this loss, added to the task and distillation terms."""

    @field_validator("layers")
    @classmethod
    def _some_pairs(cls, layers: dict[int, int] | None) -> dict[int, int] | None:
        # An empty map matches nothing: the run would train with a hidden loss of 0.
        if layers is not None and not layers:
            raise ValueError("map at least one student layer to a teacher layer, or null")
        if layers is not None and any(index < 0 for pair in layers.items() for index in pair):
            raise ValueError("layers count from 0 (the embeddings)")
        return layers


class OnPolicyConfig(Section):
    """On-policy distillation (GKD): some steps train on the student's own completions."""

    probability: float = Field(0.5, ge=0.0, le=1.0)
    """Chance that a step uses completions the student generates instead of the data's answers
    (GKD's lambda); the teacher scores the student's tokens."""
    max_new_tokens: int = Field(32, ge=1)
    """Longest completion the student generates."""
    temperature: float = Field(1.0, ge=0.0)
    """Student sampling temperature; 0 is greedy decoding."""


class DistillConfig(Section):
    """Knowledge distillation: the teacher's next-token distributions train the student."""

    teacher: TeacherConfig = Field(json_schema_extra=RESUME)
    student: StudentConfig = Field(StudentConfig(), json_schema_extra=RESUME)
    loss: Literal["forward_kl", "reverse_kl", "jsd", "tvd"] = "forward_kl"
    """Divergence between teacher and student distributions."""
    beta: float = Field(0.5, gt=0.0, lt=1.0)
    """jsd: weight of the teacher in the mixture (0.5 is the Jensen-Shannon divergence)."""
    temperature: float = Field(1.0, gt=0.0)
    """Softens both distributions; the loss is multiplied by temperature^2."""
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    """Weight of the distillation loss; the task cross-entropy gets 1 - alpha."""
    positions: Literal["target", "all"] = "target"
    """Where to distil: target tokens only, or every position of prompt and target."""
    label_tokens_only: bool = False
    """Classification: distil only the teacher's distribution over the labels' first tokens, at
    the first target position."""
    chunk_size: int = Field(128, ge=1)
    """Positions whose logits are computed at once; smaller uses less memory."""
    hidden_states: HiddenStatesConfig | None = None
    """Also match hidden states of mapped layers (online teacher only); null: logits only."""
    on_policy: OnPolicyConfig | None = None
    """Train some steps on the student's own completions (online teacher only); null: never."""
    cache: TeacherCacheConfig | None = None
    """Run the teacher once over the training split and train from its stored top-k
    distributions (teacher-cache/ in the run folder); null runs the teacher at every step."""


class AugmentConfig(Section):
    """Adversarial examples in text space: perturbed copies of training inputs (targets kept)."""

    methods: list[AugmentMethod] = ["char", "word"]
    """Families drawn from, one per perturbed example: char (adjacent swap, deletion,
    insertion, keyboard-neighbour substitution), word (deletion, swap, duplication), neighbour
    (tokens replaced by their nearest neighbours in the model's input embeddings), gradient
    (HotFlip: the token substitutions that most raise the current model's loss)."""
    probability: float = Field(0.5, ge=0.0, le=1.0)
    """Chance that a training example is perturbed at a step."""
    budget: float = Field(0.15, gt=0.0, le=1.0)
    """Fraction of the input's words (char: those of two or more letters; word) or tokens
    (neighbour, gradient) changed; never exceeded."""
    mode: Literal["add", "replace"] = "replace"
    """replace: a perturbed example takes its clean one's place; add: it joins the step."""
    neighbours: int = Field(10, ge=1)
    """Candidate substitutes per token for neighbour (and gradient with neighbours)."""
    gradient_candidates: GradientCandidates = "spelling"
    """Tokens the gradient attack may substitute. spelling: tokens one typo away (a letter
    deleted, swapped, substituted or inserted, or its case flipped): misspellings, and for whole
    words often other words ('fun' -> 'run'); misspellings: those of them that make no word of
    the training inputs (data.mix's too; seen twice or more), so the input keeps its words,
    misspelt; neighbours: the `neighbours` nearest tokens in the input embeddings, which include
    antonyms (SST-2: 'funny' became 'nasty'), so an attacked input may deserve the other
    label."""
    gradient_every: int = Field(1, ge=1)
    """The gradient attack (a forward and backward of the model) runs on every N-th step; on
    other steps examples that drew it stay clean."""

    consistency: float | None = Field(None, gt=0.0)
    """Weight of a consistency term (TRADES-style; add mode): the KL divergence from the
    model's answer distribution on each clean example, held fixed, to that on its perturbed
    copy, at the target tokens. It trains the model to answer a perturbed input as it answers
    the clean one, not only to answer it right; null: none."""

    _methods = field_validator("methods")(_distinct_methods)

    @model_validator(mode="after")
    def _consistency_needs_pairs(self) -> AugmentConfig:
        if self.consistency is not None and self.mode != "add":
            raise ValueError(
                "consistency compares each perturbed example with its clean one in the same "
                "step: it needs mode: add"
            )
        return self


class AdversarialTrainConfig(Section):
    """Adversarial training in embedding space: perturb input embeddings, train on the result."""

    method: Literal["fgm", "pgd", "freelb", "smart"] | None = None
    """fgm: one step along the loss gradient; pgd: `steps` projected ascent steps; freelb: the
    losses of every ascent step averaged (their gradients accumulate); smart: a smoothness term,
    the symmetric KL between outputs on clean and adversarially perturbed embeddings; null:
    none (NEFTune noise alone)."""
    epsilon: float = Field(0.02, gt=0.0)
    """Radius of each input position's perturbation (L2 norm, or largest entry under linf).
    Small: SmolLM2's token embeddings have L2 norms around 3, yet 0.02 at every position
    already lifts its SST-2 target cross-entropy from 5.2 to 7.5 nats (2 PGD steps)."""
    step_size: float | None = Field(None, gt=0.0)
    """Length of one ascent step; null: epsilon / steps x 1.5 (pgd, freelb, smart)."""
    steps: int = Field(2, ge=1)
    """Ascent steps of pgd, freelb and smart (fgm takes one)."""
    norm: Literal["l2", "linf"] = "l2"
    """How a position's perturbation is measured and bounded."""
    weight: float = Field(1.0, ge=0.0)
    """Weight of the adversarial term, added to the clean loss."""
    neftune_alpha: float | None = Field(None, gt=0.0)
    """NEFTune: uniform noise of scale alpha / sqrt(length x width) added to the input
    embeddings of every training forward; null: none."""

    @model_validator(mode="after")
    def _something_to_do(self) -> AdversarialTrainConfig:
        if self.method is None and self.neftune_alpha is None:
            raise ValueError(
                "method: set a method (fgm, pgd, freelb, smart), neftune_alpha, or both"
            )
        return self


class AdversarialConfig(Section):
    """Robust training: perturbed training examples and/or adversarial embedding steps."""

    augment: AugmentConfig | None = Field(None, json_schema_extra=RESUME)
    """Text-space adversarial examples; null: none."""
    train: AdversarialTrainConfig | None = None
    """Embedding-space adversarial training; null: none."""

    @model_validator(mode="after")
    def _something_to_train(self) -> AdversarialConfig:
        if self.augment is None and self.train is None:
            raise ValueError("set augment, train or both, or remove the section")
        return self


class Recipe(Section):
    """A whole recipe: what to train, on what, and where the results go."""

    model: ModelConfig = ModelConfig()
    adapter: AdapterConfig | None = AdapterConfig()
    """LoRA settings; null trains every weight of the model (full fine-tuning)."""
    data: DataConfig
    train: TrainConfig = TrainConfig()
    logging: LoggingConfig = LoggingConfig()
    validation: ValidationConfig = ValidationConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    distill: DistillConfig | None = None
    """Distil a teacher into the model; null trains on the data alone."""
    adversarial: AdversarialConfig | None = None
    """Adversarial examples and adversarial training; null: neither."""
    output: OutputConfig = OutputConfig()

    @property
    def packed(self) -> bool:
        """Whether training packs its micro-batches (`train.packing`, resolved)."""
        if self.train.packing is not None:
            return self.train.packing
        return self.data.task == "instruction"

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        problems = []
        if self.train.epochs is None and self.train.max_steps is None:
            problems.append("train.epochs: set epochs or train.max_steps")
        if self.adapter is None and self.model.quantization != "none":
            problems.append(
                "adapter: full fine-tuning (adapter: null) cannot train quantised weights; "
                "set model.quantization: none or add an adapter"
            )
        if self.model.compile and self.model.quantization != "none":
            problems.append(
                "model.compile: not measured with a quantised base (bitsandbytes' kernels); "
                "set model.compile: false or model.quantization: none"
            )
        attack = self.adversarial.train if self.adversarial is not None else None
        if self.model.compile and attack is not None and attack.method is not None:
            # The attack goes back through the clean forward twice: compiled, that backward
            # gave PGD gradients a hundred times too large (torch 2.13). NEFTune alone is fine.
            problems.append(
                f"model.compile: not with adversarial.train.method ({attack.method}), whose "
                "attack takes a second backward through the compiled layers; set "
                "model.compile: false"
            )
        problems += self._selection_problems()
        problems += self._distillation_problems()
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _distillation_problems(self) -> list[str]:
        """A student built from the teacher is named after it, and never quantised."""
        if self.distill is None:
            return []
        problems = []
        if self.distill.hidden_states is not None and self.distill.cache is not None:
            problems.append(
                "distill.hidden_states: needs the online teacher; the cache keeps logits only "
                "(set distill.cache: null)"
            )
        if self.distill.on_policy is not None and self.distill.cache is not None:
            problems.append(
                "distill.on_policy: the teacher must score the student's new completions, which "
                "a cache cannot hold (set distill.cache: null)"
            )
        if self.distill.teacher.compile:
            problems.append(
                "distill.teacher.compile: only the trained student's layers compile "
                "(model.compile); the teacher runs eagerly"
            )
        if self.distill.label_tokens_only and self.data.task != "classification":
            problems.append("distill.label_tokens_only: only for classification recipes")
        default_beta = DistillConfig.model_fields["beta"].default
        if self.distill.beta != default_beta and self.distill.loss != "jsd":
            # Only jsd mixes the two distributions; any other loss would ignore the weight.
            problems.append(
                f"distill.beta: weighs the jsd mixture only, and distill.loss is "
                f"{self.distill.loss}; set loss: jsd or leave beta out"
            )
        if self.distill.label_tokens_only and self.distill.positions == "all":
            # Only the label's first position is distilled: `all` would be ignored.
            problems.append(
                "distill.positions: all distils every position, label_tokens_only only the "
                "label's first; choose one"
            )
        if self.adversarial is not None and self.adversarial.augment is not None:
            # The student reads perturbed inputs, the teacher clean ones: only their target
            # positions correspond.
            if self.distill.positions != "target":
                problems.append(
                    "distill.positions: robust distillation (adversarial.augment) pairs the "
                    "teacher's and the student's target positions only; use target"
                )
            for key in ("hidden_states", "on_policy"):
                if getattr(self.distill, key) is not None:
                    problems.append(
                        f"distill.{key}: not available with adversarial.augment (the teacher "
                        "reads clean inputs, the student perturbed ones)"
                    )
        teacher = self.distill.teacher
        if self.distill.student.from_teacher is not None:
            if "name" in self.model.model_fields_set and self.model.name != teacher.name:
                problems.append(
                    "model.name: the student is built from the teacher "
                    "(distill.student.from_teacher); leave model.name out"
                )
            if self.model.quantization != "none":
                problems.append(
                    "model.quantization: a student built from the teacher cannot be quantised"
                )
            if teacher.quantization != "none":
                problems.append(
                    "distill.teacher.quantization: a student is built from full-precision "
                    "teacher weights; load the teacher unquantised"
                )
        return problems

    def _selection_problems(self) -> list[str]:
        """Checks of the keys that choose the best adapter, which span three sections."""
        settings, problems = self.validation, []
        task_metrics = TASKS[self.data.task].metrics
        metric = settings.best_metric
        if metric is not None and metric != "eval_loss" and metric not in task_metrics:
            choices = ", ".join(("eval_loss", *task_metrics))
            problems.append(f"validation.best_metric: {metric!r} is not one of {choices}")
        elif metric in task_metrics and settings.metric_rows is None:
            problems.append(f"validation.best_metric: {metric} needs validation.metric_rows")
        needs_eval = {"best_metric": metric, "metric_rows": settings.metric_rows}
        for key, value in needs_eval.items():
            if value is not None and settings.every is None:
                problems.append(f"validation.{key}: needs validation.every")
            if value is not None and self.data.splits.validation is None:
                problems.append(
                    f"validation.{key}: needs a validation split (data.splits.validation)"
                )
        if self.evaluation.adapter == "best" and metric is None:
            problems.append("evaluation.adapter: 'best' needs validation.best_metric")
        return problems


def resume_keys(section: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    """Dotted keys marked RESUME in the schema: changing one refuses `--resume`."""
    keys = []
    for name, info in section.model_fields.items():
        key = f"{prefix}{name}"
        if info.json_schema_extra == RESUME:
            keys.append(key)
            continue
        for candidate in get_args(info.annotation) or (info.annotation,):
            if isinstance(candidate, type) and issubclass(candidate, Section):
                keys += resume_keys(candidate, f"{key}.")
    return keys
