"""Rows -> prompt and target text -> token ids with a loss mask -> planned steps -> batches.

Rows come from a local folder of split files, a single file, or a Hub dataset. A row with a
missing, empty, mistyped or undecodable field is counted under its reason and skipped, or stops
the run naming the file and row, as `data.bad_rows` says.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from llama_tune import chat_templates, conversations
from llama_tune.chat_templates import Message, RenderedConversation
from llama_tune.errors import UserError
from llama_tune.schema import DataConfig, HubSource
from llama_tune.tasks import TASKS, TaskSpec, language_name

SPLIT_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
IGNORE_INDEX = -100


class DataError(UserError):
    """Data that cannot be read or a bad row under `bad_rows: error`."""


@dataclass
class RawRow:
    """One row as read, or the reason it could not be read."""

    number: int
    """1-based row number in its file (line number for JSON Lines)."""
    values: dict[str, Any] | None
    problem: str | None = None


@dataclass
class Example:
    """A usable row rendered for its task."""

    prompt: str
    target: str
    input_ids: list[int]
    prompt_length: int
    """Tokens before the target starts; the loss covers the rest."""
    row: int
    fields: dict[str, str] = field(default_factory=dict)
    """The row's rendered fields (input text, target, placeholders): what perturbations of the
    input start from."""
    perturbation: str | None = None
    """The augmentation method that made this example from a clean training row; None for a
    row as read."""
    earlier_answers: tuple[tuple[int, int], ...] = ()
    """Token spans [start, end) before the prompt's end that the loss also covers: the earlier
    assistant turns of a conversation."""
    source: int = 0
    """Where the row comes from: 0 the main data source, i the i-th of `data.mix`."""

    @property
    def target_length(self) -> int:
        """Tokens the task cross-entropy covers."""
        earlier = sum(end - start for start, end in self.earlier_answers)
        return len(self.input_ids) - self.prompt_length + earlier


@dataclass
class SplitStats:
    """What happened to the rows of one split; goes into the run summary."""

    origin: str
    format: str | None = None
    """The row format read (instruction rows), None for a task's own fields."""
    rows_read: int = 0
    rows_used: int = 0
    truncated: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "origin": self.origin,
            "format": self.format,
            "rows_read": self.rows_read,
            "rows_used": self.rows_used,
            "truncated": self.truncated,
            "skipped": dict(sorted(self.skipped.items())),
        }


def skip_reasons(skipped: Counter[str]) -> str:
    """Skipped rows by reason, for a message: "empty_field:text 3, invalid_json 1"."""
    return ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items()))


def describe_rows(name: str, origin: str, used: str, skipped: Counter[str], details: Path) -> str:
    """One console line on a split's rows: how many are used, and which were skipped and why
    (`details` names the file that records them)."""
    line = f"{name}: {origin}: {used}"
    if skipped:
        reasons = skip_reasons(skipped)
        line += f"; skipped {sum(skipped.values())} rows ({reasons}; recorded in {details})"
    return line


@dataclass
class Split:
    """The encoded examples of one split and how they were obtained."""

    examples: list[Example]
    stats: SplitStats


# --------------------------------------------------------------------------------------- reading


def split_file(source: Path, split: str) -> Path | None:
    """The file holding `split` inside a data folder, if any; two of them (train.jsonl beside
    train.csv) are an error, as one would be read and the other silently not."""
    candidates = [source / f"{split}{suffix}" for suffix in SPLIT_SUFFIXES]
    present = [candidate for candidate in candidates if candidate.exists()]
    if len(present) > 1:
        names = " and ".join(candidate.name for candidate in present)
        raise DataError(f"{source}: both {names} hold the {split!r} split; keep one")
    if present and not present[0].is_file():
        raise DataError(f"{present[0]}: the {split!r} split must be a file, not a folder")
    return present[0] if present else None


# Files saved by Excel or Notepad may start with a UTF-8 byte-order mark; every reader drops it.
UTF8_BOM = "utf-8-sig"


def _read_json_lines(path: Path) -> Iterator[RawRow]:
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                values = json.loads(line.decode(UTF8_BOM if number == 1 else "utf-8"))
            except UnicodeDecodeError:
                yield RawRow(number, None, "undecodable")
                continue
            except json.JSONDecodeError:
                yield RawRow(number, None, "invalid_json")
                continue
            if isinstance(values, dict):
                yield RawRow(number, values)
            else:
                yield RawRow(number, None, "not_an_object")


def _read_json_array(path: Path) -> Iterator[RawRow]:
    try:
        records = json.loads(path.read_text(encoding=UTF8_BOM))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON array of objects")
    for number, values in enumerate(records, start=1):
        yield (
            RawRow(number, values)
            if isinstance(values, dict)
            else RawRow(number, None, "not_an_object")
        )


def _read_csv(path: Path) -> Iterator[RawRow]:
    # surrogateescape keeps undecodable bytes visible as lone surrogates, so they can be counted.
    with path.open(encoding=UTF8_BOM, errors="surrogateescape", newline="") as handle:
        reader = csv.DictReader(handle)
        for number, values in enumerate(reader, start=2):
            text = "".join(str(value) for value in values.values() if value is not None)
            if any("\udc80" <= char <= "\udcff" for char in text):
                yield RawRow(number, None, "undecodable")
            else:
                yield RawRow(number, dict(values))


def _read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet

    try:
        records = pyarrow.parquet.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({error})") from None
    for number, values in enumerate(records, start=1):
        yield RawRow(number, values)


# The reasons a reader gives for a row it could not read, as an error names them.
READ_PROBLEMS = {
    "invalid_json": "not JSON (a .jsonl file holds one JSON object per line)",
    "not_an_object": "not a JSON object of named fields",
    "undecodable": "not UTF-8 text",
}


class Readability:
    """Watches a file's rows go by: when none of them could be read, the file is not in the
    format its name says, and `check` names its first row rather than a missing field."""

    def __init__(self, origin: str, rows: Iterator[RawRow]) -> None:
        self.origin = origin
        self.rows = rows
        self.readable = 0
        self.first_unreadable: RawRow | None = None

    def __iter__(self) -> Iterator[RawRow]:
        for row in self.rows:
            if row.problem not in READ_PROBLEMS:
                self.readable += 1
            elif self.first_unreadable is None:
                self.first_unreadable = row
            yield row

    def check(self) -> None:
        """Stop when rows were seen and not one of them could be read."""
        row = self.first_unreadable
        if self.readable == 0 and row is not None and row.problem is not None:
            raise DataError(
                f"{self.origin}: row {row.number}: {READ_PROBLEMS[row.problem]}; "
                "no row of the file could be read"
            )


READERS = {
    ".jsonl": _read_json_lines,
    ".json": _read_json_array,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def _hub_dataset(source: HubSource) -> Any:
    """Every split of a Hub dataset (a datasets.DatasetDict), loaded once per process."""
    files = json.dumps(source.data_files, sort_keys=True)
    return _load_hub_dataset(source.hub, source.config, source.revision, files)


@functools.cache
def _load_hub_dataset(dataset_id: str, config: str | None, revision: str | None, files: str) -> Any:
    import datasets

    options: dict[str, Any] = {"revision": revision} if revision else {}
    data_files = json.loads(files)
    if data_files is not None:
        options["data_files"] = data_files
    try:
        return datasets.load_dataset(dataset_id, config, **options)
    except Exception as error:  # datasets raises many types for unreachable or unknown ids
        message = " ".join(str(error).split()) or repr(error)
        raise DataError(f"cannot load dataset {dataset_id!r}: {message[:400]}") from None


def _read_hub_split(rows: Any) -> Iterator[RawRow]:
    """Rows of a Hub split, class-label integers given as their names (0 -> "negative")."""
    import datasets

    names = {
        column: feature
        for column, feature in rows.features.items()
        if isinstance(feature, datasets.ClassLabel)
    }
    for number, values in enumerate(rows, start=1):
        values = dict(values)
        for column, feature in names.items():
            if isinstance(values.get(column), int):
                # -1 is datasets' "no label" (GLUE's unlabelled test rows): a missing field.
                label = values[column]
                values[column] = feature.int2str(label) if label >= 0 else None
        yield RawRow(number, values)


def open_split(source: str | HubSource, split: str) -> tuple[str, Iterator[RawRow]] | None:
    """(origin, rows) of a split, or None when the source has no such split.

    A folder holds one file per split; a single file is the train split; anything else that is
    not a local path is taken as a Hub dataset id.
    """
    if isinstance(source, HubSource):
        return _open_hub_split(source, split)
    path = Path(source).expanduser()
    if path.is_dir():
        found = split_file(path, split)
        if found is None:
            return None
        return str(found), READERS[found.suffix](found)
    if path.is_file():
        if path.suffix not in READERS:
            raise DataError(f"{source}: unsupported file type; use {', '.join(SPLIT_SUFFIXES)}")
        return (str(path), READERS[path.suffix](path)) if split == "train" else None
    if source.startswith((".", "/", "~")) or path.suffix in READERS:
        raise DataError(f"data source {source} not found")
    return _open_hub_split(HubSource(hub=source), split)


def _open_hub_split(source: HubSource, split: str) -> tuple[str, Iterator[RawRow]] | None:
    splits = _hub_dataset(source)
    if split not in splits:
        return None
    return f"{source}[{split}]", _read_hub_split(splits[split])


# ------------------------------------------------------------------------------------- rendering


class TaskFormatter:
    """Renders rows of one task into prompt and target text, as the recipe says.

    Instruction rows come in several formats (`conversations`): the recipe's, or the one the
    first usable row is written in, which then holds for every file of the source.
    """

    def __init__(
        self, config: DataConfig, labels: list[str] | None = None, strict_labels: bool = True
    ) -> None:
        """`strict_labels=False` keeps rows whose label is outside `labels` (for scoring)."""
        self.config = config
        self.strict_labels = strict_labels
        self.task: TaskSpec = TASKS[config.task]
        self.template = config.template or self.task.template
        self.labels = labels
        self.columns = {**dict(self.task.default_columns), **config.fields}
        self.row_format: str | None = None
        if config.task != "instruction":
            self.row_format = "fields"
        elif config.format != "auto":
            self.row_format = config.format
        self._chat: dict[int, chat_templates.ChatTemplate | None] = {}

    @property
    def conversational(self) -> bool:
        return self.row_format in conversations.CONVERSATIONAL

    def chat_template(
        self, tokenizer: PreTrainedTokenizerBase
    ) -> chat_templates.ChatTemplate | None:
        """The template rows are rendered with, None for plain text: the recipe's choice, else
        the tokenizer's own for conversations. Resolved once per tokenizer."""
        if id(tokenizer) not in self._chat:
            choice = self.config.chat.template
            if choice is None and self.conversational:
                choice = chat_templates.TOKENIZER
            self._chat[id(tokenizer)] = (
                None if choice is None else chat_templates.resolve(choice, tokenizer)
            )
        return self._chat[id(tokenizer)]

    def stop_strings(
        self, tokenizer: PreTrainedTokenizerBase, multiline: bool | None = None
    ) -> list[str]:
        """Where a generated answer ends besides the end-of-sequence token: the chat template's
        end of turn, or a plain template's line end where answers are one line. `multiline`
        says whether they may span lines; unsaid, instruction answers may (code, lists: cut
        at their first line they would be scored short), a task's label or sentence may not."""
        template = self.chat_template(tokenizer)
        if template is not None:
            return template.stop_strings(tokenizer)
        if multiline is None:
            multiline = self.task.name == "instruction"
        return [] if multiline else ["\n"]

    def adopt_format(self, values: dict[str, Any]) -> None:
        """Take the row format from the first usable row when the recipe leaves it to the data."""
        if self.row_format is None:
            mapped = self.column("prompt") in values and self.column("completion") in values
            self.row_format = "prompt_completion" if mapped else conversations.detect(values)

    def column(self, task_field: str) -> str:
        return self.columns.get(task_field, task_field)

    def text_field(self, values: dict[str, Any], task_field: str) -> str:
        """A row's text for `task_field`; raises ValueError naming the bad-row reason."""
        column = self.column(task_field)
        if column not in values or values[column] is None:
            raise ValueError(f"missing_field:{column}")
        value = values[column]
        if task_field == self.task.target_field and isinstance(value, bool | int):
            value = str(value)
        if not isinstance(value, str):
            raise ValueError(f"wrong_type:{column}")
        if not value.strip():
            raise ValueError(f"empty_field:{column}")
        return value

    def fields(self, values: dict[str, Any]) -> dict[str, str]:
        """Every placeholder value of a row, plus the target; raises ValueError on a bad row."""
        rendered = {name: self.text_field(values, name) for name in self.task.input_fields}
        rendered[self.task.target_field] = self.text_field(values, self.task.target_field).strip()
        target = rendered[self.task.target_field]
        if self.labels is not None and self.strict_labels and target not in self.labels:
            raise ValueError("unknown_label")
        return rendered | self._extra_placeholders(values)

    def _extra_placeholders(self, values: dict[str, Any]) -> dict[str, str]:
        """The template's values besides the row's input: the label set, and the languages
        (the recipe's, else the row's); ValueError when the row lacks a language."""
        rendered = {} if self.labels is None else {"labels": ", ".join(self.labels)}
        for name, configured in (
            ("source_lang", self.config.languages.source),
            ("target_lang", self.config.languages.target),
        ):
            if name in self.task.extra_placeholders:
                code = configured or self.text_field(values, name)
                rendered[name] = language_name(code)
        return rendered

    def text_fields(self, text: str) -> dict[str, str]:
        """The placeholder values of a prompt for `text` typed outside any row (chat): `text`
        as the task's input, the label set and the recipe's languages."""
        try:
            return dict.fromkeys(self.task.input_fields, text) | self._extra_placeholders({})
        except ValueError:  # only a language can be missing: the rows named theirs
            columns = f"{self.column('source_lang')}, {self.column('target_lang')}"
            raise DataError(
                f"data.languages: the rows name their languages (columns {columns}) and a text "
                "outside them names none; give them, e.g. data.languages.source=en "
                "data.languages.target=de"
            ) from None

    def prompt(self, fields: dict[str, str], tokenizer: PreTrainedTokenizerBase) -> str:
        """The prompt text of a single-prompt row: the task template, as a user turn of the
        chat template (after the system prompt) when there is one."""
        prompt = self.template.format(**fields)
        template = self.chat_template(tokenizer)
        if template is None:
            return prompt
        turns = [{"role": "user", "content": prompt}]
        if self.config.chat.system_prompt is not None:
            turns.insert(0, {"role": "system", "content": self.config.chat.system_prompt})
        return template.render(turns, tokenizer, add_generation_prompt=True)

    def prompt_ids(self, fields: dict[str, str], tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """The prompt as training encodes it: with the tokenizer's special tokens (its
        beginning of sequence) after a plain template; a chat rendering holds its own as text."""
        special = self.chat_template(tokenizer) is None
        return _encode_text(tokenizer, self.prompt(fields, tokenizer), special)

    def target(self, fields: dict[str, str], tokenizer: PreTrainedTokenizerBase) -> str:
        """The target text: after a space in a plain template, with the chat template's end of
        turn (the end-of-sequence token follows a plain one)."""
        target = fields[self.task.target_field]
        template = self.chat_template(tokenizer)
        return f" {target}" if template is None else target + template.turn_end


# -------------------------------------------------------------------------------------- encoding


def _encode_text(tokenizer: PreTrainedTokenizerBase, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def encode(
    fields: dict[str, str],
    formatter: TaskFormatter,
    tokenizer: PreTrainedTokenizerBase,
) -> tuple[list[int], int, bool] | None:
    """(input_ids, prompt_length, truncated) for one row, or None when it is too long to keep.

    Too-long rows lose the end of their long input text (the instruction and the answer cue stay),
    then, if the target alone still does not fit, the end of the target.
    """
    config = formatter.config
    target_ids = _encode_text(tokenizer, formatter.target(fields, tokenizer), False)
    # A plain target ends with the end-of-sequence token; a chat-rendered one with its end of turn.
    if formatter.chat_template(tokenizer) is None:
        target_ids.append(tokenizer.eos_token_id)
    prompt_ids = formatter.prompt_ids(fields, tokenizer)
    overflow = len(prompt_ids) + len(target_ids) - config.max_length
    if overflow <= 0:
        return prompt_ids + target_ids, len(prompt_ids), False
    if not _shortens(config, len(prompt_ids) + len(target_ids)):
        return None
    long_field = formatter.task.truncatable_field
    field_ids = _encode_text(tokenizer, fields[long_field], False)
    shortened = dict(fields)
    # Re-tokenising decoded text can merge tokens differently, so trim until it fits.
    for extra in (0, 2, 8, 32):
        keep = max(len(field_ids) - overflow - extra, 1)
        shortened[long_field] = tokenizer.decode(field_ids[:keep])
        prompt_ids = formatter.prompt_ids(shortened, tokenizer)
        if len(prompt_ids) + len(target_ids) <= config.max_length or keep == 1:
            break
    room_for_target = max(config.max_length - len(prompt_ids), 1)
    return prompt_ids + target_ids[:room_for_target], len(prompt_ids), True


def _shortens(config: DataConfig, length: int) -> bool:
    """Whether a row of `length` tokens, over `data.max_length`, is shortened (`truncate`) or
    dropped (`drop`); under `error`, ValueError naming its length."""
    if config.truncation == "error":
        raise ValueError(f"too_long ({length} > {config.max_length})")
    return config.truncation == "truncate"


def _without_first_exchange(messages: list[Message]) -> list[Message] | None:
    """The conversation without its first user turn and the answer to it; None when that
    would leave no answer."""
    first = 1 if messages[0]["role"] == "system" else 0
    answers = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    if len(answers) < 2:
        return None
    return messages[:first] + messages[first + 2 :]


def _with_shorter_question(
    messages: list[Message], overflow: int, tokenizer: PreTrainedTokenizerBase
) -> Iterator[list[Message]]:
    """The conversation with the end of its last question cut by about `overflow` tokens, then
    by a little more each time (re-tokenising decoded text can merge tokens differently)."""
    last = chat_templates.last_answer(messages)
    question_ids = _encode_text(tokenizer, messages[last - 1]["content"], False)
    for extra in (0, 2, 8, 32):
        keep = max(len(question_ids) - overflow - extra, 1)
        shortened = [dict(message) for message in messages]
        shortened[last - 1]["content"] = tokenizer.decode(question_ids[:keep])
        yield shortened
        if keep == 1:
            return


def encode_conversation(
    messages: list[Message], formatter: TaskFormatter, tokenizer: PreTrainedTokenizerBase
) -> tuple[RenderedConversation, bool] | None:
    """The conversation rendered within `data.max_length`, and whether it was shortened;
    None when it cannot be kept.

    Too-long conversations lose whole exchanges from the start (the system turn stays), then the
    end of the last question; the last answer is never cut: a row whose last exchange does not
    fit even so is too long.
    """
    config = formatter.config
    template = formatter.chat_template(tokenizer)
    assert template is not None
    rendered = chat_templates.render(messages, template, tokenizer)
    if len(rendered.input_ids) <= config.max_length:
        return rendered, False
    if not _shortens(config, len(rendered.input_ids)):
        return None
    while len(rendered.input_ids) > config.max_length:
        shorter = _without_first_exchange(messages)
        if shorter is None:
            break
        messages = shorter
        rendered = chat_templates.render(messages, template, tokenizer)
    overflow = len(rendered.input_ids) - config.max_length
    if overflow > 0:
        for shortened in _with_shorter_question(messages, overflow, tokenizer):
            rendered = chat_templates.render(shortened, template, tokenizer)
            if len(rendered.input_ids) <= config.max_length:
                break
    return (rendered, True) if len(rendered.input_ids) <= config.max_length else None


def encode_plain_text(
    text: str, formatter: TaskFormatter, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], bool] | None:
    """Plain text as token ids with the end-of-sequence token, its end cut to
    `data.max_length` under `truncation: truncate`; None when it is dropped."""
    config = formatter.config
    input_ids = [*_encode_text(tokenizer, text, True), tokenizer.eos_token_id]
    if len(input_ids) <= config.max_length:
        return input_ids, False
    if not _shortens(config, len(input_ids)):
        return None
    return input_ids[: config.max_length], True


def collect_labels(config: DataConfig, rows: Iterator[RawRow]) -> tuple[list[str], Counter[str]]:
    """The sorted set of label strings in the training rows (classification), and the rows
    without a usable label counted by reason."""
    formatter = TaskFormatter(config)
    labels = set()
    problems: Counter[str] = Counter()
    for row in rows:
        try:
            if row.values is None:
                raise ValueError(row.problem)
            labels.add(formatter.text_field(row.values, "label").strip())
        except ValueError as error:
            problems[str(error)] += 1
    return sorted(labels), problems


@dataclass
class RenderedRow:
    """A row that rendered and encoded."""

    row: RawRow
    fields: dict[str, str]
    prompt: str
    input_ids: list[int]
    prompt_length: int
    truncated: bool
    earlier_answers: tuple[tuple[int, int], ...] = ()


def render_row(
    row: RawRow, formatter: TaskFormatter, tokenizer: PreTrainedTokenizerBase
) -> RenderedRow | None:
    """One row rendered and encoded in the source's format; None when it is too long to keep,
    ValueError with the bad-row reason when it does not fit."""
    if row.problem is not None:
        raise ValueError(row.problem)
    assert row.values is not None
    formatter.adopt_format(row.values)
    if formatter.row_format == "text":
        text = formatter.text_field(row.values, "text")
        encoded_text = encode_plain_text(text, formatter, tokenizer)
        if encoded_text is None:
            return None
        input_ids, truncated = encoded_text
        # The first token is never predicted: the loss covers every later one.
        fields = {"prompt": "", "completion": text}
        return RenderedRow(row, fields, "", input_ids, 1, truncated)
    if not formatter.conversational:
        fields = formatter.fields(row.values)
        encoded = encode(fields, formatter, tokenizer)
        if encoded is None:
            return None
        return RenderedRow(row, fields, formatter.prompt(fields, tokenizer), *encoded)
    assert formatter.row_format is not None
    messages = conversations.to_messages(
        row.values, formatter.row_format, formatter.config.chat.system_prompt
    )
    conversation = encode_conversation(messages, formatter, tokenizer)
    if conversation is None:
        return None
    rendered, truncated = conversation
    *earlier, (prompt_length, _) = rendered.answers
    if formatter.config.chat.assistant_turns == "last":
        earlier = []
    fields = conversations.last_exchange(messages)
    return RenderedRow(
        row, fields, rendered.prompt, rendered.input_ids, prompt_length, truncated, tuple(earlier)
    )


def rendered_rows(
    origin: str,
    rows: Iterator[RawRow],
    formatter: TaskFormatter,
    tokenizer: PreTrainedTokenizerBase,
    skipped: Counter[str],
    strict: bool,
) -> Iterator[RenderedRow]:
    """The rows that render and encode; the rest are counted in `skipped` by reason.

    With `strict`, a bad row (under `bad_rows: error`) or an over-long one (under
    `truncation: error`) stops with a DataError naming the file and row instead.
    """
    for row in rows:
        try:
            rendered = render_row(row, formatter, tokenizer)
        except ValueError as error:
            too_long = str(error).startswith("too_long")
            if strict and (too_long or formatter.config.bad_rows == "error"):
                raise DataError(
                    f"{origin}: row {row.number}: {error}{_expected(formatter)}"
                ) from None
            skipped["too_long" if too_long else str(error)] += 1
            continue
        if rendered is None:
            skipped["too_long"] += 1
            continue
        yield rendered


def _expected(formatter: TaskFormatter) -> str:
    """What the rows of an instruction source must hold, for a bad row's error."""
    row_format = formatter.row_format
    if row_format is None:
        listing = "; ".join(conversations.expected(name) for name in conversations.FORMATS)
        return f" (instruction rows hold one of: {listing})"
    if row_format == "fields":
        return ""
    return f" (format {row_format}: expected {conversations.expected(row_format)})"


def build_split(
    origin: str,
    rows: Iterator[RawRow],
    formatter: TaskFormatter,
    tokenizer: PreTrainedTokenizerBase,
    limit: int | None = None,
) -> Split:
    """Encode the usable rows of one split, counting every skipped row under its reason."""
    stats = SplitStats(origin=origin)
    examples = []
    readability = Readability(origin, rows)
    for rendered in rendered_rows(
        origin, iter(readability), formatter, tokenizer, stats.skipped, strict=True
    ):
        stats.truncated += rendered.truncated
        examples.append(
            Example(
                prompt=rendered.prompt,
                target=rendered.fields[formatter.task.target_field],
                input_ids=rendered.input_ids,
                prompt_length=rendered.prompt_length,
                row=rendered.row.number,
                fields=rendered.fields,
                earlier_answers=rendered.earlier_answers,
            )
        )
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        readability.check()
    stats.format = None if formatter.row_format == "fields" else formatter.row_format
    stats.rows_used = len(examples)
    stats.rows_read = stats.rows_used + sum(stats.skipped.values())
    return Split(examples=examples, stats=stats)


@dataclass
class Datasets:
    """The encoded splits of a recipe and the label set (classification)."""

    train: Split
    validation: Split | None
    labels: list[str] | None
    mixed: list[SplitStats] = field(default_factory=list)
    """What was read from each source of `data.mix` (the train split holds its examples)."""

    def summary(self) -> dict[str, Any]:
        splits = {"train": self.train.stats.as_dict()}
        if self.validation is not None:
            splits["validation"] = self.validation.stats.as_dict()
        summary: dict[str, Any] = {"labels": self.labels, "splits": splits}
        if self.mixed:
            counts = Counter(example.source for example in self.train.examples)
            summary["mix"] = [
                stats.as_dict() | {"examples": counts[index + 1]}
                for index, stats in enumerate(self.mixed)
            ]
        return summary


def _open_train(config: DataConfig) -> tuple[str, Iterator[RawRow]]:
    opened = open_split(config.source, config.splits.train)
    if opened is None:
        raise DataError(f"data source {config.source} has no {config.splits.train!r} split")
    return opened


def refuse_perturbing(row_format: str | None, origin: str, key: str) -> None:
    """Perturbations rewrite a row's one prompt: stop naming `key` when the rows have none
    (plain text) or several turns (conversations)."""
    if row_format not in ("fields", "prompt_completion", None):
        raise DataError(
            f"{key}: perturbations rewrite the one prompt of a row, and {origin} holds "
            f"{row_format} rows; use prompt/completion rows or turn {key} off"
        )


def _mix_settings(config: DataConfig, index: int) -> DataConfig:
    """The data settings `data.mix[index]` is read with: the recipe's, with that source's own
    folder, row format and fields."""
    mixed = config.mix[index]
    return config.model_copy(
        update={"source": mixed.source, "format": mixed.format, "fields": mixed.fields}
    )


def _open_mixed(config: DataConfig, index: int) -> tuple[str, Iterator[RawRow]]:
    mixed = config.mix[index]
    opened = open_split(mixed.source, mixed.split)
    if opened is None:
        raise DataError(f"data.mix.{index}: {mixed.source} has no {mixed.split!r} split")
    return opened


def training_inputs(formatter: TaskFormatter) -> Iterator[str]:
    """The input-field texts of every readable row training reads (the training split and each
    `data.mix` source's), whatever `max_train_rows` says: the text a lexicon of the data's own
    words is read from."""
    config = formatter.config
    sources = [(formatter, _open_train(config)[1])]
    for index in range(len(config.mix)):
        mixed = TaskFormatter(_mix_settings(config, index), formatter.labels)
        sources.append((mixed, _open_mixed(config, index)[1]))
    for source, rows in sources:
        for row in rows:
            if row.values is None:
                continue
            for name in source.task.input_fields:
                with contextlib.suppress(ValueError):
                    yield source.text_field(row.values, name)


def adopt_training_format(formatter: TaskFormatter) -> None:
    """Give `formatter` the format of the recipe's training rows, read from the first usable
    one as training read it, when neither the recipe nor the task says what it is."""
    if formatter.row_format is not None:
        return
    _, rows = _open_train(formatter.config)
    for row in rows:
        if row.values is not None:
            with contextlib.suppress(ValueError):  # a row in no format: training skipped it
                formatter.adopt_format(row.values)
        if formatter.row_format is not None:
            return


def label_set(config: DataConfig) -> list[str] | None:
    """The classification labels: the recipe's, or those of the training split; else None."""
    if config.task != "classification" or config.labels is not None:
        return config.labels
    origin, rows = _open_train(config)
    readability = Readability(origin, rows)
    labels, problems = collect_labels(config, iter(readability))
    if not labels:
        readability.check()
    if not labels and not problems:
        raise DataError(f"{origin}: the file holds no rows")
    if not labels:
        column = TaskFormatter(config).column("label")
        raise DataError(
            f"{origin}: no row has a usable label in column {column!r} ({skip_reasons(problems)}); "
            "name the label column with data.fields: {label: COLUMN}"
        )
    return labels


def held_out(
    origin: str, rows: Iterator[RawRow], fraction: float, seed: int
) -> tuple[tuple[str, Iterator[RawRow]], tuple[str, Iterator[RawRow]]]:
    """(train, validation) from one split: `fraction` of its rows, chosen with `seed`, held out
    as validation; both keep the file's order and row numbers."""
    every = list(rows)
    count = max(1, round(fraction * len(every)))
    order = torch.randperm(len(every), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    kept = [row for index, row in enumerate(every) if index not in held]
    validation = [row for index, row in enumerate(every) if index in held]
    label = f"{origin} (held out: {count} of {len(every)} rows, seed {seed})"
    return (origin, iter(kept)), (label, iter(validation))


def open_scored_split(
    config: DataConfig, split: str, seed: int
) -> tuple[str, Iterator[RawRow]] | None:
    """The rows of `split` to score: the source's own, or, for a validation split the source
    lacks, the training rows `splits.validation_fraction` held out (chosen with `seed`, the
    recipe's train.seed, as training chose them); None when there are neither."""
    opened = open_split(config.source, split)
    fraction = config.splits.validation_fraction
    if opened is None and split == config.splits.validation and fraction is not None:
        _, opened = held_out(*_open_train(config), fraction, seed)
    return opened


def _with_rows(split: Split, key: str = "") -> Split:
    """The split, which must have usable rows to train on; `key` names the recipe entry it
    comes from where the file alone would not say (a `data.mix` source)."""
    if not split.examples:
        where = f"{key}: " if key else ""
        skipped = dict(split.stats.skipped)
        raise DataError(f"{where}{split.stats.origin}: no usable rows ({skipped})")
    return split


def _check_listed_labels(config: DataConfig, splits: list[Split]) -> None:
    """Stop when a label of `data.labels` names no row the recipe reads (the training rows with
    `data.mix`, and the validation rows): a misspelt label would skip every row of its class as
    unknown_label and train on the others."""
    assert config.labels is not None
    used = {example.target for split in splits for example in split.examples}
    unused = [label for label in config.labels if label not in used]
    if unused:
        within = (
            f" within data.max_train_rows {config.max_train_rows}" if config.max_train_rows else ""
        )
        raise DataError(
            f"data.labels: {unused} label no usable row of {splits[0].stats.origin}{within} "
            f"(skipped: {skip_reasons(splits[0].stats.skipped) or 'none'})"
        )


def _refuse_mixing_held_out_rows(config: DataConfig) -> None:
    """Stop when a `data.mix` source is the main source's training split, whose rows
    `splits.validation_fraction` holds out: they would be trained on and then validated on."""
    for index, mixed in enumerate(config.mix):
        if str(mixed.source) == str(config.source) and mixed.split == config.splits.train:
            raise DataError(
                f"data.mix.{index}.split: {mixed.split} holds the rows "
                "data.splits.validation_fraction holds out of the main source, which would be "
                "trained on and then validated on"
            )


def build(config: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> Datasets:
    """Read, render and encode the train and validation splits of a recipe; `seed` (the
    recipe's train.seed) picks the rows `splits.validation_fraction` holds out."""
    labels = label_set(config)
    opened = _open_train(config)
    validation_opened = None
    if config.splits.validation is not None:
        validation_opened = open_split(config.source, config.splits.validation)
    fraction = config.splits.validation_fraction
    if validation_opened is None and fraction is not None:
        _refuse_mixing_held_out_rows(config)
        opened, validation_opened = held_out(*opened, fraction, seed)
    formatter = TaskFormatter(config, labels)
    train = _with_rows(build_split(*opened, formatter, tokenizer, config.max_train_rows))
    validation = None
    if validation_opened is not None:
        validation = build_split(*validation_opened, formatter, tokenizer, config.max_eval_rows)
    mixed = [
        mixed_examples(config, index, labels, tokenizer, len(train.examples), seed)
        for index in range(len(config.mix))
    ]
    for split in mixed:
        train.examples += split.examples
    if config.labels is not None:
        _check_listed_labels(config, [train, *([validation] if validation else [])])
    stats = [split.stats for split in mixed]
    return Datasets(train=train, validation=validation, labels=labels, mixed=stats)


def mixed_examples(
    config: DataConfig,
    index: int,
    labels: list[str] | None,
    tokenizer: PreTrainedTokenizerBase,
    main_count: int,
    seed: int,
) -> Split:
    """The examples `data.mix[index]` adds to an epoch whose `main_count` main-source examples
    are the share its weights leave: drawn with `seed` in a shuffled order, again and again
    when the source has fewer rows than its share."""
    formatter = TaskFormatter(_mix_settings(config, index), labels)
    split = build_split(*_open_mixed(config, index), formatter, tokenizer)
    split = _with_rows(split, f"data.mix.{index}")
    weight = config.mix[index].weight
    main_share = 1.0 - sum(source.weight for source in config.mix)
    wanted = round(weight * main_count / main_share)
    if wanted == 0:
        # Rounded to no example, the source would be read, listed in the summary and never trained.
        raise DataError(
            f"data.mix.{index}.weight: {weight} of an epoch whose main source gives "
            f"{main_count} examples is less than half an example; raise the weight"
        )
    generator = torch.Generator().manual_seed(seed + index + 1)
    drawn: list[Example] = []
    while len(drawn) < wanted:
        order = torch.randperm(len(split.examples), generator=generator).tolist()
        drawn += [split.examples[i] for i in order[: wanted - len(drawn)]]
    split.examples = [replace(example, source=index + 1) for example in drawn]
    return split


# -------------------------------------------------------------------------------------- batching


def plan_epoch(
    lengths: list[int], step_size: int, generator: torch.Generator, by_length: bool = True
) -> list[list[int]]:
    """Example indices of each optimizer step of one epoch, shuffled, grouped by length if asked.

    Grouped, the shuffled order is cut into chunks of 64 steps; each chunk is sorted by length
    and cut into steps, and the steps are shuffled, so a step holds rows of similar length
    (little padding) while the epoch stays random. Ungrouped, each step is a random draw (packed
    rows have no padding to save). The incomplete last step is dropped so that every step has
    the same number of examples.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    steps = []
    chunk_size = step_size * (64 if by_length else 1)
    for start in range(0, len(order) - step_size + 1, chunk_size):
        chunk = sorted(order[start : start + chunk_size], key=lambda index: lengths[index])
        steps += [chunk[i : i + step_size] for i in range(0, len(chunk) - step_size + 1, step_size)]
    shuffled = torch.randperm(len(steps), generator=generator).tolist()
    return [steps[i] for i in shuffled]


def micro_batches(
    step: list[int], lengths: list[int], count: int, packed: bool = False
) -> list[list[int]]:
    """Split one step's examples into `count` equal micro-batches: of similar length where they
    are padded (less padding), of similar total length where they are packed (processes then
    wait less for each other), dealt out longest first, back and forth."""
    ordered = sorted(step, key=lambda index: lengths[index])
    if not packed:
        size = len(ordered) // count
        return [ordered[i * size : (i + 1) * size] for i in range(count)]
    batches: list[list[int]] = [[] for _ in range(count)]
    for position, index in enumerate(reversed(ordered)):
        lap, offset = divmod(position, count)
        batches[offset if lap % 2 == 0 else count - 1 - offset].append(index)
    return batches


def _labels(example: Example) -> torch.Tensor:
    """The example's tokens where the loss covers them (target, earlier answers), else -100."""
    ids = torch.tensor(example.input_ids, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[example.prompt_length :] = ids[example.prompt_length :]
    for start, end in example.earlier_answers:
        labels[start:end] = ids[start:end]
    return labels


def collate(examples: list[Example], pad_token_id: int, bucket: int) -> dict[str, torch.Tensor]:
    """Right-pad to a multiple of `bucket`; labels are -100 outside the target tokens."""
    longest = max(len(example.input_ids) for example in examples)
    width = -(-longest // bucket) * bucket
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, :length] = _labels(example)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_packed(
    examples: list[Example], pad_token_id: int = 0, bucket: int = 1
) -> dict[str, torch.Tensor]:
    """The examples end to end in one row, without attention mask: position ids restart at 0 at
    each example, which keeps attention inside it (`packing`). As in a padded row, an example's
    first token is no target: nothing predicts across a boundary.

    The row ends in a filler of pad tokens up to a multiple of `bucket`, a segment of its own that
    nothing attends to or scores. It bounds the distinct row lengths: oneDNN builds its bf16
    CPU kernels for each new shape (measured: 281 GFLOP/s over new shapes, 362 over seen ones).
    """
    labels = [_labels(example) for example in examples]
    for example_labels in labels:
        example_labels[0] = IGNORE_INDEX
    tokens = [t for example in examples for t in example.input_ids]
    filler = -len(tokens) % bucket
    return {
        "input_ids": torch.tensor([tokens + [pad_token_id] * filler]),
        "labels": torch.cat([*labels, torch.full((filler,), IGNORE_INDEX)])[None],
        "position_ids": torch.cat(
            [*(torch.arange(len(e.input_ids)) for e in examples), torch.arange(filler)]
        )[None],
    }


def fingerprint(examples: list[Example]) -> str:
    """A hash of the encoded examples and of the tokens their loss covers, in order: what a
    resumed run's steps ahead and a teacher cache's shards (its distilled positions) are
    drawn from."""
    digest = hashlib.sha256()
    for example in examples:
        covered = [example.prompt_length, example.input_ids]
        if example.earlier_answers:
            # A conversation's earlier answers the loss covers; rows without any hash as they
            # always did, so existing caches and checkpoints stay valid.
            covered.append(example.earlier_answers)
        digest.update(json.dumps(covered).encode())
    return digest.hexdigest()[:16]


def eval_batches(split: Split, batch_size: int) -> list[list[Example]]:
    """Fixed, length-sorted batches for evaluation (no randomness, little padding)."""
    ordered = sorted(split.examples, key=lambda example: len(example.input_ids))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
