"""Data: the shared datasets load by task name alone; bad rows are counted or named."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import TEST_DATA
from llama_tune import data
from llama_tune.schema import DataConfig


def _config(source: Path | str, task: str, **extra: object) -> DataConfig:
    return DataConfig(source=str(source), task=task, **extra)


@pytest.mark.parametrize(
    ("folder", "task", "has_validation"),
    [
        ("classification/sst2", "classification", True),
        ("classification/trec", "classification", False),
        ("summarisation/aeslc", "summarisation", True),
        ("translation/multi30k_en_de", "translation", True),
    ],
)
def test_shared_datasets_load_by_task_alone(
    data_root: Path, tokenizer, folder: str, task: str, has_validation: bool
) -> None:
    built = data.build(
        _config(data_root / folder, task, max_train_rows=200, max_eval_rows=50), tokenizer
    )
    assert len(built.train.examples) == 200
    assert not built.train.stats.skipped
    assert (built.validation is not None) == has_validation
    example = built.train.examples[0]
    assert example.input_ids[-1] == tokenizer.eos_token_id
    target_text = tokenizer.decode(example.input_ids[example.prompt_length : -1])
    assert target_text.strip() == example.target
    if task == "classification":
        assert built.labels is not None
        assert example.target in built.labels
        assert ", ".join(built.labels) in example.prompt
    if task == "translation":
        assert "from English to German" in example.prompt
    if task == "summarisation":
        assert "Summary:" in example.prompt


def test_trec_labels_are_the_six_coarse_classes(data_root: Path, tokenizer) -> None:
    built = data.build(
        _config(data_root / "classification/trec", "classification", max_train_rows=10), tokenizer
    )
    assert built.labels == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


BAD_ROWS = [
    b'{"text": "a fine film", "label": "positive"}',
    b'{"text": "", "label": "negative"}',
    b'{"label": "negative"}',
    b'{"text": 42, "label": "negative"}',
    b'{"text": "broken \xff\xfe bytes", "label": "negative"}',
    b"{not json",
    b'["a list"]',
    b'{"text": "dull", "label": "negative"}',
    b'{"text": "ok", "label": null}',
]


@pytest.fixture
def bad_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(b"\n".join(BAD_ROWS) + b"\n")
    return folder


def test_bad_rows_are_counted_by_reason(bad_folder: Path, tokenizer) -> None:
    built = data.build(_config(bad_folder, "classification"), tokenizer)
    stats = built.train.stats
    assert stats.rows_read == len(BAD_ROWS)
    assert stats.rows_used == 2
    assert stats.skipped == Counter(
        {
            "empty_field:text": 1,
            "missing_field:text": 1,
            "wrong_type:text": 1,
            "undecodable": 1,
            "invalid_json": 1,
            "not_an_object": 1,
            "missing_field:label": 1,
        }
    )
    assert built.summary()["splits"]["train"]["skipped"]["undecodable"] == 1


def test_bad_rows_error_names_file_and_row(bad_folder: Path, tokenizer) -> None:
    with pytest.raises(data.DataError, match=r"train\.jsonl: row 2: empty_field:text"):
        data.build(_config(bad_folder, "classification", bad_rows="error"), tokenizer)


def test_unknown_label_with_a_fixed_label_set(bad_folder: Path, tokenizer) -> None:
    built = data.build(_config(bad_folder, "classification", labels=["positive"]), tokenizer)
    assert built.train.stats.skipped["unknown_label"] == 1
    assert built.labels == ["positive"]


def test_field_mapping_and_csv(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text('sentence,sentiment\ngreat fun,pos\n"long, slow",neg\nmeh,\n')
    built = data.build(
        _config(path, "classification", fields={"text": "sentence", "label": "sentiment"}),
        tokenizer,
    )
    assert [example.target for example in built.train.examples] == ["pos", "neg"]
    assert built.train.stats.skipped == Counter({"empty_field:sentiment": 1})
    assert built.validation is None


def test_parquet_split_folder(tmp_path: Path, tokenizer) -> None:
    import pyarrow
    import pyarrow.parquet

    rows = [{"prompt": "Say hi.", "completion": "hi"}, {"prompt": "Say bye.", "completion": "bye"}]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "train.parquet")
    built = data.build(_config(tmp_path, "instruction"), tokenizer)
    assert [example.prompt for example in built.train.examples] == ["Say hi.", "Say bye."]


def test_chat_template_wraps_the_prompt(tokenizer) -> None:
    built = data.build(
        _config(
            TEST_DATA / "sentiment",
            "classification",
            chat={"template": "tokenizer"},
            max_train_rows=3,
        ),
        tokenizer,
    )
    example = built.train.examples[0]
    assert example.prompt.startswith("<|im_start|>")
    assert example.prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(example.input_ids[example.prompt_length :]) == (
        f"{example.target}{tokenizer.eos_token}"
    )


def _long_rows(folder: Path) -> Path:
    folder.mkdir()
    document = " ".join(f"word{i}" for i in range(400))
    rows = [{"document": document, "summary": "many words"}, {"document": "short", "summary": "s"}]
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_truncation_keeps_the_cue_and_the_target(tmp_path: Path, tokenizer) -> None:
    folder = _long_rows(tmp_path / "long")
    built = data.build(_config(folder, "summarisation", max_length=64), tokenizer)
    long_example = built.train.examples[0]
    assert len(long_example.input_ids) <= 64
    assert built.train.stats.truncated == 1
    assert tokenizer.decode(long_example.input_ids[: long_example.prompt_length]).endswith(
        "Summary:"
    )
    assert tokenizer.decode(long_example.input_ids[long_example.prompt_length : -1]).strip() == (
        "many words"
    )


def test_truncation_drop_and_error(tmp_path: Path, tokenizer) -> None:
    folder = _long_rows(tmp_path / "long")
    dropped = data.build(
        _config(folder, "summarisation", max_length=64, truncation="drop"), tokenizer
    )
    assert dropped.train.stats.skipped == Counter({"too_long": 1})
    with pytest.raises(data.DataError, match=r"row 1: too_long"):
        data.build(_config(folder, "summarisation", max_length=64, truncation="error"), tokenizer)


def test_missing_sources_are_clear_errors(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(data.DataError, match="not found"):
        data.build(_config(tmp_path / "nowhere", "classification"), tokenizer)
    with pytest.raises(data.DataError, match="no 'train' split"):
        data.build(_config(tmp_path, "classification"), tokenizer)
    with pytest.raises(data.DataError, match="cannot load dataset"):
        data.build(_config("no-such-user/no-such-dataset", "classification"), tokenizer)


@pytest.mark.parametrize("by_length", [True, False])
def test_epoch_plan_is_seeded_complete_and_grouped_if_asked(by_length: bool) -> None:
    lengths = [
        int(n) for n in torch.randint(5, 200, (1000,), generator=torch.Generator().manual_seed(1))
    ]
    plan = data.plan_epoch(lengths, 16, torch.Generator().manual_seed(7), by_length)
    again = data.plan_epoch(lengths, 16, torch.Generator().manual_seed(7), by_length)
    other = data.plan_epoch(lengths, 16, torch.Generator().manual_seed(8), by_length)
    assert plan == again
    assert plan != other
    assert len(plan) == 1000 // 16
    assert all(len(step) == 16 for step in plan)
    used = [index for step in plan for index in step]
    assert len(set(used)) == len(used)
    # Grouped by length, a step's spread is far below that of a random step: 16 lengths drawn
    # from 5-199 span about 170 on average. Packed rows have no padding to save, so their
    # steps are random draws.
    spread = sum(max(lengths[i] for i in s) - min(lengths[i] for i in s) for s in plan) / len(plan)
    assert spread < 30 if by_length else spread > 140


def test_micro_batches_are_alike_in_length_padded_and_in_total_packed() -> None:
    lengths = [
        int(n) for n in torch.randint(5, 500, (32,), generator=torch.Generator().manual_seed(3))
    ]
    step = list(range(32))
    padded = data.micro_batches(step, lengths, 4)
    packed = data.micro_batches(step, lengths, 4, packed=True)
    for batches in (padded, packed):
        assert [len(batch) for batch in batches] == [8, 8, 8, 8]
        assert sorted(index for batch in batches for index in batch) == step
    # Padded: each micro-batch a run of the sorted lengths, so little padding in each.
    ordered = sorted(lengths)
    assert [sorted(lengths[i] for i in batch) for batch in padded] == [
        ordered[start : start + 8] for start in range(0, 32, 8)
    ]
    # Packed: the processes' rows hold about as many tokens each (the padded split's totals
    # differ several-fold).
    totals = [sum(lengths[i] for i in batch) for batch in packed]
    assert max(totals) - min(totals) <= max(lengths)
    assert max(totals) < 1.15 * min(totals)


def test_collate_masks_prompt_and_padding() -> None:
    examples = [
        data.Example(prompt="p", target="t", input_ids=[5, 6, 7, 8], prompt_length=2, row=1),
        data.Example(prompt="p", target="t", input_ids=[5, 6, 9], prompt_length=1, row=2),
    ]
    batch = data.collate(examples, pad_token_id=0, bucket=8)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"][0].tolist() == [-100, -100, 7, 8] + [-100] * 4
    assert batch["labels"][1].tolist() == [-100, 6, 9] + [-100] * 5
    assert batch["attention_mask"].sum().item() == 7


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("train.csv", "text,label\ngreat fun,pos\nslow,neg\n"),
        (
            "train.jsonl",
            '{"text": "great fun", "label": "pos"}\n{"text": "slow", "label": "neg"}\n',
        ),
        ("train.json", '[{"text": "great fun", "label": "pos"}, {"text": "slow", "label": "neg"}]'),
    ],
)
def test_a_byte_order_mark_is_read_past(tmp_path: Path, tokenizer, name: str, content: str) -> None:
    # Excel and Notepad save UTF-8 with a byte-order mark before the first character.
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + content.encode())
    built = data.build(_config(tmp_path, "classification"), tokenizer)
    assert [example.target for example in built.train.examples] == ["pos", "neg"]
    assert not built.train.stats.skipped


def test_missing_labels_say_why(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(data.DataError, match=r"train\.jsonl: the file holds no rows"):
        data.build(_config(tmp_path, "classification"), tokenizer)
    (tmp_path / "train.jsonl").write_text('{"text": "fine", "sentiment": "pos"}\n{"text": "ok"}\n')
    with pytest.raises(data.DataError) as caught:
        data.build(_config(tmp_path, "classification"), tokenizer)
    assert "no row has a usable label in column 'label' (missing_field:label 2)" in str(
        caught.value
    )
    built = data.build(
        _config(tmp_path, "classification", fields={"label": "sentiment"}), tokenizer
    )
    assert built.labels == ["pos"]


def _hub_sentiment(splits: tuple[str, ...]) -> object:
    """A Hub dataset as datasets serves it: integer class labels with names, these splits."""
    import datasets

    rows = [json.loads(line) for line in (TEST_DATA / "sentiment" / "train.jsonl").open()]
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["negative", "positive"]),
        }
    )
    columns = {"text": [row["text"] for row in rows], "label": [row["label"] for row in rows]}
    columns["label"][-1] = -1  # datasets' "no label"
    split = datasets.Dataset.from_dict(columns, features=features)
    return datasets.DatasetDict(dict.fromkeys(splits, split))


def test_a_hub_dataset_gives_label_names_and_may_lack_a_validation_split(
    monkeypatch: pytest.MonkeyPatch, tokenizer
) -> None:
    import datasets

    def load_dataset(dataset_id: str, name: str | None, **options: object) -> object:
        assert (dataset_id, name, options) == ("someone/sentiment", None, {})
        return _hub_sentiment(("train",))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data._load_hub_dataset.cache_clear()
    config = DataConfig(source="someone/sentiment", task="classification")
    built = data.build(config, tokenizer)
    data._load_hub_dataset.cache_clear()
    assert built.labels == ["negative", "positive"]
    assert built.validation is None
    assert built.train.stats.origin == "someone/sentiment[train]"
    assert built.train.stats.skipped == Counter({"missing_field:label": 1})
    assert {example.target for example in built.train.examples} == {"negative", "positive"}


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """SST-2 and TREC rows laid out as the Hub serves a dataset with two configurations:
    parquet files written by datasets with class-label features, listed in README.md."""
    import datasets

    folder = tmp_path_factory.mktemp("hub")
    for config, source, names in [
        ("sst2", "classification/sst2", ["negative", "positive"]),
        ("trec", "classification/trec", ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]),
    ]:
        for split in ("train", "validation"):
            path = data_root / source / f"{split}.jsonl"
            if not path.is_file():
                continue
            rows = [json.loads(line) for line in path.open()][:120]
            features = datasets.Features(
                {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
            )
            columns = {
                "sentence": [row["text"] for row in rows],
                "label": [names.index(row["label"]) for row in rows],
            }
            table = datasets.Dataset.from_dict(columns, features=features)
            table.to_parquet(folder / config / f"{split}-00000-of-00001.parquet")
    (folder / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: sst2\n  data_files:\n  - split: train\n    path: sst2/train-*\n"
        "  - split: validation\n    path: sst2/validation-*\n"
        "- config_name: trec\n  data_files:\n  - split: train\n    path: trec/train-*\n---\n"
    )
    return folder


def _hub_config(folder: Path, config: str, **splits: object) -> DataConfig:
    return DataConfig(
        source={"hub": str(folder), "config": config},
        task="classification",
        fields={"text": "sentence"},
        splits=splits,
    )


def test_a_hub_configuration_is_read_with_its_label_names(hub_folder: Path, tokenizer) -> None:
    built = data.build(_hub_config(hub_folder, "sst2"), tokenizer)
    assert built.labels == ["negative", "positive"]
    assert built.train.stats.origin == f"{hub_folder}/sst2[train]"
    assert (built.train.stats.rows_used, built.validation.stats.rows_used) == (120, 120)
    trec = data.build(_hub_config(hub_folder, "trec"), tokenizer)
    assert trec.labels == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert trec.validation is None
    with pytest.raises(data.DataError, match=r"cannot load dataset .*'nope' not found.*sst2"):
        data.build(_hub_config(hub_folder, "nope"), tokenizer)
    with pytest.raises(data.DataError, match=r"Config name is missing.*sst2"):
        data.build(DataConfig(source={"hub": str(hub_folder)}, task="classification"), tokenizer)


def test_a_validation_fraction_is_held_out_reproducibly(hub_folder: Path, tokenizer) -> None:
    settings = _hub_config(hub_folder, "trec", validation_fraction=0.25)
    first, again = data.build(settings, tokenizer, seed=3), data.build(settings, tokenizer, seed=3)
    other = data.build(settings, tokenizer, seed=4)

    def rows(split: data.Split) -> list[int]:
        return [example.row for example in split.examples]

    assert rows(first.validation) == rows(again.validation)
    assert rows(first.validation) != rows(other.validation)
    assert len(rows(first.validation)) == 30
    assert sorted(rows(first.train) + rows(first.validation)) == list(range(1, 121))
    assert "held out: 30 of 120 rows, seed 3" in first.validation.stats.origin
    # A source with its own validation split keeps it.
    sst2 = data.build(_hub_config(hub_folder, "sst2", validation_fraction=0.25), tokenizer)
    assert sst2.validation.stats.rows_used == 120


def test_hub_revision_and_files_reach_datasets(monkeypatch: pytest.MonkeyPatch, tokenizer) -> None:
    import datasets

    calls = []

    def load_dataset(dataset_id: str, name: str | None, **options: object) -> object:
        calls.append((dataset_id, name, options))
        return _hub_sentiment(("train", "validation"))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data._load_hub_dataset.cache_clear()
    files = {"train": ["a.parquet", "b.parquet"]}
    source = {"hub": "someone/sentiment", "revision": "v1.2", "data_files": files}
    built = data.build(DataConfig(source=source, task="classification"), tokenizer)
    data.build(DataConfig(source=source, task="classification"), tokenizer)
    data._load_hub_dataset.cache_clear()
    assert calls == [("someone/sentiment", None, {"revision": "v1.2", "data_files": files})]
    assert built.train.stats.origin == "someone/sentiment@v1.2[train]"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"hello world\nmore prose\n", "row 1: not JSON"),
        (b'["a", "list"]\n[1]\n', "row 1: not a JSON object"),
        (b"\n\xff\xfe\n", "row 2: not UTF-8 text"),
    ],
)
@pytest.mark.parametrize("task", ["classification", "instruction"])
def test_a_file_with_no_readable_row_names_its_first_row(
    tmp_path: Path, tokenizer, content: bytes, problem: str, task: str
) -> None:
    (tmp_path / "train.jsonl").write_bytes(content)
    with pytest.raises(data.DataError, match=rf"train\.jsonl: {problem}.*no row of the file"):
        data.build(_config(tmp_path, task), tokenizer)


def test_a_split_in_two_files_or_in_a_folder_is_named(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "train.jsonl").write_text('{"text": "fine", "label": "positive"}\n')
    (tmp_path / "train.csv").write_text("text,label\nfine,positive\n")
    with pytest.raises(data.DataError, match=r"both train\.jsonl and train\.csv hold the 'train'"):
        data.build(_config(tmp_path, "classification"), tokenizer)
    (tmp_path / "train.csv").unlink()
    (tmp_path / "validation.jsonl").mkdir()
    with pytest.raises(data.DataError, match=r"validation\.jsonl: the 'validation' split must be"):
        data.build(_config(tmp_path, "classification"), tokenizer)


def test_a_listed_label_that_labels_no_row_is_named(data_root: Path, tokenizer) -> None:
    sst2 = data_root / "classification" / "sst2"
    listed = _config(sst2, "classification", labels=["positive", "neutral"], max_train_rows=200)
    with pytest.raises(data.DataError, match=r"data.labels: \['neutral'\] label no usable row"):
        data.build(listed, tokenizer)
    both = _config(sst2, "classification", labels=["negative", "positive"], max_train_rows=200)
    assert data.build(both, tokenizer).labels == ["negative", "positive"]


def test_a_listed_label_may_come_from_a_mixed_source(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "main.jsonl").write_text('{"text": "fine", "label": "positive"}\n' * 4)
    (tmp_path / "more.jsonl").write_text('{"text": "dull", "label": "negative"}\n' * 4)
    mix = [{"source": str(tmp_path / "more.jsonl"), "weight": 0.5}]
    labels = ["negative", "positive"]
    settings = _config(tmp_path / "main.jsonl", "classification", mix=mix, labels=labels)
    built = data.build(settings, tokenizer)
    assert {example.target for example in built.train.examples} == {"negative", "positive"}


def test_training_inputs_are_read_from_every_source_training_reads(tmp_path: Path) -> None:
    # The misspellings attack's lexicon: a word only a mixed source holds is a word too. The
    # mixed source names its text column itself; rows it cannot read are left out.
    (tmp_path / "main.jsonl").write_text('{"text": "fine", "label": "positive"}\n')
    rows = ['{"review": "dull", "label": "negative"}', '{"label": "negative"}']
    (tmp_path / "more.jsonl").write_text("\n".join(rows) + "\n")
    mix = [{"source": str(tmp_path / "more.jsonl"), "weight": 0.5, "fields": {"text": "review"}}]
    settings = _config(tmp_path / "main.jsonl", "classification", mix=mix)
    formatter = data.TaskFormatter(settings, ["negative", "positive"])
    assert list(data.training_inputs(formatter)) == ["fine", "dull"]
    missing = settings.model_copy(
        update={"mix": [settings.mix[0].model_copy(update={"split": "x"})]}
    )
    with pytest.raises(data.DataError, match=r"data.mix.0: .*more.jsonl has no 'x' split"):
        list(data.training_inputs(data.TaskFormatter(missing)))


def test_the_fingerprint_covers_the_tokens_the_loss_covers(data_root: Path, tokenizer) -> None:
    # ShareGPT conversations train on their earlier answers too: the same tokens with the loss
    # on the last answer alone are other training examples (a resume or a teacher cache of
    # the one must not pass for the other). Rows without earlier answers hash as they always
    # did (the teacher caches built before keep their manifests).
    config = DataConfig(
        source=str(data_root / "instruction" / "sharegpt_dummy"),
        task="instruction",
        max_length=256,
        max_train_rows=3,
    )
    examples = data.build(config, tokenizer).train.examples
    assert any(example.earlier_answers for example in examples)
    last_answers = [dataclasses.replace(e, earlier_answers=()) for e in examples]
    assert data.fingerprint(examples) != data.fingerprint(last_answers)
    expected = hashlib.sha256()
    for example in last_answers:
        expected.update(json.dumps([example.prompt_length, example.input_ids]).encode())
    assert data.fingerprint(last_answers) == expected.hexdigest()[:16]
