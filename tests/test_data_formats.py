"""Data in instruction formats: conversations encoded with their loss mask, plain text, errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from llama_tune import chat_templates, data
from llama_tune.schema import DataConfig


def _config(source: Path | str, **extra: object) -> DataConfig:
    return DataConfig(source=str(source), task="instruction", **extra)


def _write(folder: Path, rows: list[dict], split: str = "train") -> Path:
    folder.mkdir(exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def _loss_text(example: data.Example, tokenizer) -> list[str]:
    """The decoded runs of tokens the loss covers, as collate labels them."""
    labels = data.collate([example], tokenizer.pad_token_id, 1)["labels"][0].tolist()
    runs, current = [], []
    for token in [*labels, data.IGNORE_INDEX]:
        if token != data.IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


@pytest.mark.parametrize(
    ("folder", "row_format", "rows"),
    [
        ("alpaca_en_demo", "alpaca", 899),
        ("alpaca_en_demo_messages", "messages", 899),
        ("sharegpt_dummy", "sharegpt", 450),
    ],
)
def test_shared_chat_data_builds_in_its_detected_format(
    data_root: Path, tokenizer, folder: str, row_format: str, rows: int
) -> None:
    built = data.build(_config(data_root / "instruction" / folder, max_length=1024), tokenizer)
    stats = built.train.stats
    assert (stats.format, stats.rows_read) == (row_format, rows)
    assert stats.rows_used + stats.skipped["too_long"] == rows
    assert set(stats.skipped) <= {"too_long"}
    assert built.validation is None


def test_every_answer_of_a_sharegpt_row_carries_the_loss(data_root: Path, tokenizer) -> None:
    source = data_root / "instruction" / "sharegpt_dummy"
    built = data.build(_config(source, max_train_rows=3), tokenizer)
    example = built.train.examples[0]
    row = json.loads((source / "train.jsonl").read_text().splitlines()[0])
    answers = [turn["value"] for turn in row["conversations"] if turn["from"] == "gpt"]
    assert _loss_text(example, tokenizer) == [f"{answer}<|im_end|>" for answer in answers]
    assert example.fields == {"prompt": "Have a nice day!", "completion": "You too!"}
    assert example.target == "You too!"
    assert example.prompt.endswith("Have a nice day!<|im_end|>\n<|im_start|>assistant\n")
    assert example.target_length == sum(
        len(tokenizer(a + "<|im_end|>")["input_ids"]) for a in answers
    )
    last_only = data.build(
        _config(source, max_train_rows=3, chat={"assistant_turns": "last"}), tokenizer
    )
    assert _loss_text(last_only.train.examples[0], tokenizer) == ["You too!<|im_end|>"]


def test_alpaca_and_its_messages_copy_encode_the_same(data_root: Path, tokenizer) -> None:
    folder = data_root / "instruction"
    settings = {
        "max_train_rows": 40,
        "chat": {"system_prompt": "Be helpful.", "template": "llama-3"},
    }
    alpaca = data.build(_config(folder / "alpaca_en_demo", **settings), tokenizer)
    chats = data.build(_config(folder / "alpaca_en_demo_messages", **settings), tokenizer)
    for one, other in zip(alpaca.train.examples, chats.train.examples, strict=True):
        assert (one.input_ids, one.prompt_length) == (other.input_ids, other.prompt_length)
    example = alpaca.train.examples[0]
    assert "Be helpful." in example.prompt
    assert _loss_text(example, tokenizer) == [f"{example.target}<|eot_id|>"]


def test_a_row_in_another_format_names_file_row_and_what_was_expected(
    tmp_path: Path, tokenizer
) -> None:
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]},
    ]
    folder = _write(tmp_path / "mixed", rows)
    skipped = data.build(_config(folder), tokenizer).train.stats
    assert (skipped.rows_used, skipped.skipped) == (1, Counter({"missing_field:messages": 1}))
    with pytest.raises(data.DataError) as error:
        data.build(_config(folder, bad_rows="error"), tokenizer)
    assert str(error.value) == (
        f"{folder / 'train.jsonl'}: row 2: missing_field:messages "
        "(format messages: expected a 'messages' list of {role, content} turns, content a string "
        "or a list of text parts)"
    )
    unknown = _write(tmp_path / "unknown", [{"question": "Hi", "answer": "Hey"}])
    with pytest.raises(data.DataError, match=r"row 1: unknown_format \(instruction rows hold one"):
        data.build(_config(unknown, bad_rows="error"), tokenizer)
    forced = data.build(_config(folder, format="sharegpt"), tokenizer).train.stats
    assert forced.skipped == Counter({"missing_field:conversations": 1})


def _turns(count: int, words: int) -> list[dict]:
    text = " ".join(["word"] * words)
    turns = [{"role": "system", "content": "Be brief."}]
    for index in range(count):
        turns += [
            {"role": "user", "content": f"question {index}: {text}"},
            {"role": "assistant", "content": f"answer {index}"},
        ]
    return turns


def test_a_long_conversation_loses_its_first_exchanges_never_its_last_answer(
    tmp_path: Path, tokenizer
) -> None:
    rows = [{"messages": _turns(4, 30)}, {"messages": _turns(1, 400)}, {"messages": _turns(1, 3)}]
    folder = _write(tmp_path / "long", rows)
    built = data.build(_config(folder, max_length=100), tokenizer)
    kept, shortened, _ = built.train.examples
    assert built.train.stats.truncated == 2
    assert max(len(kept.input_ids), len(shortened.input_ids)) <= 100
    assert "Be brief." in kept.prompt
    assert "question 0" not in kept.prompt
    assert _loss_text(kept, tokenizer)[-1] == "answer 3<|im_end|>"
    assert _loss_text(shortened, tokenizer) == ["answer 0<|im_end|>"]
    assert shortened.prompt.count("word") < 400
    dropped = data.build(_config(folder, max_length=100, truncation="drop"), tokenizer)
    assert dropped.train.stats.skipped == Counter({"too_long": 2})
    answer = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "long " * 200}]
    unfit = _write(tmp_path / "unfit", [{"messages": answer}, {"messages": _turns(1, 3)}])
    unfit_stats = data.build(_config(unfit, max_length=100), tokenizer).train.stats
    assert (unfit_stats.rows_used, unfit_stats.skipped) == (1, Counter({"too_long": 1}))


def test_plain_text_carries_the_loss_on_every_token(tmp_path: Path, tokenizer) -> None:
    folder = _write(tmp_path / "text", [{"text": "The cat sat on the mat."}, {"text": "Hi " * 50}])
    built = data.build(_config(folder, max_length=32), tokenizer)
    short, long = built.train.examples
    assert built.train.stats.format == "text"
    assert short.prompt_length == 1
    assert short.input_ids[-1] == tokenizer.eos_token_id
    assert short.target_length == len(tokenizer("The cat sat on the mat.")["input_ids"])
    assert (len(long.input_ids), built.train.stats.truncated) == (32, 1)


def test_a_task_prompt_in_a_named_template_ends_with_its_turn_end(tokenizer) -> None:
    from conftest import TEST_DATA

    settings = DataConfig(
        source=str(TEST_DATA / "sentiment"),
        task="classification",
        chat={"template": "chatml", "system_prompt": "Label the sentiment."},
        max_train_rows=2,
    )
    example = data.build(settings, tokenizer).train.examples[0]
    assert example.prompt.startswith("<|im_start|>system\nLabel the sentiment.<|im_end|>\n")
    assert _loss_text(example, tokenizer) == [f"{example.target}<|im_end|>"]
    template = chat_templates.resolve("chatml", tokenizer)
    assert data.TaskFormatter(settings).stop_strings(tokenizer) == []
    assert template.turn_end == tokenizer.eos_token


def _mixed(data_root: Path, weight: float, **extra: object) -> DataConfig:
    folder = data_root / "instruction"
    return _config(
        folder / "alpaca_en_demo",
        mix=[{"source": str(folder / "sharegpt_dummy"), "weight": weight}],
        max_length=1024,
        **extra,
    )


def test_a_mixed_source_takes_its_share_of_every_epoch(data_root: Path, tokenizer) -> None:
    built = data.build(_mixed(data_root, 0.3), tokenizer, seed=5)
    sources = [example.source for example in built.train.examples]
    # 899 alpaca rows are 70%: the ShareGPT source adds round(0.3 * 899 / 0.7) examples.
    assert (sources.count(0), sources.count(1)) == (899, 385)
    summary = built.summary()
    assert summary["splits"]["train"]["format"] == "alpaca"
    assert summary["mix"][0]["format"] == "sharegpt"
    assert (summary["mix"][0]["rows_used"], summary["mix"][0]["examples"]) == (450, 385)
    lengths = [len(example.input_ids) for example in built.train.examples]
    plan = data.plan_epoch(lengths, 16, torch.Generator().manual_seed(0))
    planned = [sources[index] for step in plan for index in step]
    share = planned.count(1) / len(planned)
    # Only the incomplete last step is left out of an epoch: the share stays within 1 point.
    assert abs(share - 0.3) < 0.01
    again = data.build(_mixed(data_root, 0.3), tokenizer, seed=5)
    other = data.build(_mixed(data_root, 0.3), tokenizer, seed=6)

    def mixed_rows(datasets: data.Datasets) -> list[int]:
        return [example.row for example in datasets.train.examples if example.source == 1]

    assert mixed_rows(again) == mixed_rows(built)
    assert mixed_rows(other) != mixed_rows(built)


def test_a_source_smaller_than_its_share_is_cycled(data_root: Path, tokenizer) -> None:
    built = data.build(_mixed(data_root, 0.9, max_train_rows=100), tokenizer)
    mixed = [example.row for example in built.train.examples if example.source == 1]
    # 100 main rows are 10%: the 450 ShareGPT rows must give 900 examples, each row twice.
    assert len(mixed) == 900
    assert sorted(mixed[:450]) == list(range(1, 451))
    assert sorted(mixed) == sorted(list(range(1, 451)) * 2)


def test_a_weight_that_rounds_to_no_example_is_refused(data_root: Path, tokenizer) -> None:
    # 0.001 of 100 main rows is 0.1 example: the source was read and never trained on.
    with pytest.raises(data.DataError, match=r"^data\.mix\.0\.weight: 0\.001 of an epoch .* 100 "):
        data.build(_mixed(data_root, 0.001, max_train_rows=100), tokenizer)


def test_a_mixed_source_without_usable_rows_is_named_by_its_entry(
    data_root: Path, tokenizer
) -> None:
    # Its rows in another task's columns: the error named the file, not the recipe entry.
    settings = DataConfig(
        source=str(data_root / "classification" / "sst2"),
        task="classification",
        max_train_rows=50,
        mix=[{"source": str(data_root / "instruction" / "alpaca_en_demo"), "weight": 0.2}],
    )
    with pytest.raises(data.DataError, match=r"^data\.mix\.0: .*alpaca_en_demo.*: no usable rows"):
        data.build(settings, tokenizer)


def test_a_mixed_source_may_not_train_on_held_out_rows(tmp_path: Path, tokenizer) -> None:
    # Without a validation split, validation_fraction holds out training rows: the same split
    # mixed in trained on them.
    rows = [{"text": f"row {n}", "label": ["negative", "positive"][n % 2]} for n in range(20)]
    source = _write(tmp_path / "rows", rows)
    settings = DataConfig(
        source=str(source),
        task="classification",
        splits={"validation_fraction": 0.2},
        mix=[{"source": str(source), "weight": 0.2}],
    )
    with pytest.raises(data.DataError, match=r"^data\.mix\.0\.split: train holds the rows"):
        data.build(settings, tokenizer)
