"""Adversarial examples in training: seeded choices, clean targets, exact resume, the preview."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest

from llama_tune import cli, config, data, models, run_folder, schema, train
from llama_tune.adversarial import augment, text_noise

ALL_METHODS = "adversarial.augment.methods=[char,word,neighbour,gradient]"


@pytest.fixture
def augmenter(tiny_recipe) -> tuple[augment.Augmenter, list[data.Example]]:
    recipe = config.load(tiny_recipe(), [ALL_METHODS, "adversarial.augment.probability=0.8"])
    loaded = models.load(recipe.model, recipe.adapter)
    datasets = data.build(recipe.data, loaded.tokenizer)
    formatter = data.TaskFormatter(recipe.data, datasets.labels)
    assert recipe.adversarial is not None
    assert recipe.adversarial.augment is not None
    made = augment.Augmenter(
        recipe.adversarial.augment, formatter, loaded.tokenizer, loaded.model, 7, "no"
    )
    return made, datasets.train.examples[:32]


def test_perturbations_are_seeded_and_leave_targets_alone(augmenter) -> None:
    made, examples = augmenter
    indices = list(range(len(examples)))
    first = made.perturb(3, indices, examples)
    again = made.perturb(3, indices, examples)
    assert [item.example.input_ids for item in first] == [item.example.input_ids for item in again]
    assert [item.method for item in first] != [
        item.method for item in made.perturb(4, indices, examples)
    ]
    methods = {item.method for item in first}
    assert {"char", "word", "neighbour", "gradient"} <= methods
    for item in first:
        clean, perturbed = item.clean, item.example
        assert perturbed.target == clean.target
        assert perturbed.fields["label"] == clean.fields["label"]
        assert (
            perturbed.input_ids[perturbed.prompt_length :] == clean.input_ids[clean.prompt_length :]
        )
        if item.method is None:
            assert perturbed is clean
        else:
            assert perturbed.input_ids != clean.input_ids
            assert perturbed.fields["text"] != clean.fields["text"]


@pytest.mark.parametrize("pool", ["spelling", "misspellings", "neighbours"])
def test_gradient_attack_takes_tokens_from_the_chosen_pool(augmenter, pool: str) -> None:
    made, examples = augmenter
    settings = made.settings.model_copy(update={"gradient_candidates": pool})
    # The pool's own tables: a misspellings pool reads the training split's words too.
    made = augment.Augmenter(settings, made.formatter, made.tokenizer, made.model, 7, "no")
    attacked = made.perturb(0, list(range(8)), examples[:8], ["gradient"] * 8)
    swaps = 0
    for item in attacked:
        for clean, token in zip(item.clean.input_ids, item.example.input_ids, strict=True):
            if clean != token:
                swaps += 1
                if pool != "neighbours":
                    assert token in made.substitutes.spellings(clean)
                else:
                    assert token in made.substitutes.nearest(clean, made.settings.neighbours)
        if pool == "misspellings":
            new_words = set(text_noise.words_of(item.example.fields["text"])) - set(
                text_noise.words_of(item.clean.fields["text"])
            )
            assert made.lexicon is not None
            assert not new_words & made.lexicon
    assert swaps >= 8


def test_add_mode_appends_perturbed_copies(augmenter) -> None:
    made, examples = augmenter
    made.settings = made.settings.model_copy(update={"mode": "add"})
    indices = [[0, 1, 2, 3], [4, 5, 6, 7]]
    batches = [[examples[i] for i in batch] for batch in indices]
    new_indices, new_batches = made.training_batches(5, indices, batches)
    for before, after, after_indices in zip(batches, new_batches, new_indices, strict=True):
        assert after[: len(before)] == before
        assert len(after) == len(after_indices)
        for index, example in zip(after_indices[len(before) :], after[len(before) :], strict=True):
            assert example.target == examples[index].target
    assert sum(len(batch) for batch in new_batches) > 8


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / run_folder.METRICS).open()]


def test_augmented_training_resumes_exactly(resumes_exactly) -> None:
    overrides = [ALL_METHODS, "adversarial.augment.mode=add", "adapter.dropout=0.1"]
    overrides.append("adversarial.augment.consistency=1.0")
    expected = resumes_exactly("augment", overrides)
    steps = [record for record in _metrics(expected.run_dir) if "loss" in record]
    assert steps[-1]["loss"] < steps[0]["loss"]
    # Every step holds perturbed copies (probability 0.5 of 8 rows): the term is always there.
    assert all(record["consistency_loss"] > 0 for record in steps)


def test_preview_prints_clean_and_perturbed_rows(tiny_recipe, capsys) -> None:
    path = tiny_recipe()
    assert cli.main(["augment", str(path), ALL_METHODS, "--show", "4"]) == 0
    shown = capsys.readouterr().out
    for method in ("char", "word", "neighbour", "gradient"):
        assert f"· {method}" in shown
    assert shown.count("clean") == 4
    assert shown.count("perturbed") == 4
    assert cli.main(["augment", str(path)]) == cli.USAGE_ERROR
    assert "no adversarial.augment section" in capsys.readouterr().err


def test_the_preview_attacks_a_student_cut_from_its_teacher(
    tiny_recipe, tiny_model_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The student trains on the attacks: the preview's gradient method attacks it (one of the
    # teacher's two layers, a fresh adapter on it), not the recipe's base model.
    attacked = []
    real = augment.Augmenter.__init__

    def recording(self, settings, formatter, tokenizer, model, *rest) -> None:
        attacked.append(model)
        real(self, settings, formatter, tokenizer, model, *rest)

    monkeypatch.setattr(augment.Augmenter, "__init__", recording)
    distilled = [
        f"distill.teacher.name={tiny_model_dir}",
        "distill.student.from_teacher.keep_layers=[1]",
        "adversarial.augment={methods: [gradient]}",
    ]
    assert cli.main(["augment", str(tiny_recipe()), *distilled, "--show", "2"]) == 0
    (model,) = attacked
    assert isinstance(model, peft.PeftModel)
    assert model.get_base_model().config.num_hidden_layers == 1


def test_bad_adversarial_sections_are_named() -> None:
    base = {"data": {"source": "x", "task": "classification"}}
    recipe = base | {
        "adversarial": {"augment": {"methods": [], "budget": 0}, "train": {"method": None}},
        "distill": {"teacher": {"name": "t"}, "positions": "all", "hidden_states": {}},
    }
    with pytest.raises(config.RecipeError) as caught:
        config.parse(recipe, "bad.yaml")
    problems = "\n".join(caught.value.problems)
    assert "adversarial.augment.methods" in problems
    assert "adversarial.augment.budget" in problems
    assert "adversarial.train" in problems
    assert "neftune_alpha" in problems
    with pytest.raises(config.RecipeError) as caught:
        config.parse(
            base
            | {
                "adversarial": {"augment": {}},
                "distill": {"teacher": {"name": "t"}, "positions": "all", "hidden_states": {}},
            },
            "bad.yaml",
        )
    problems = "\n".join(caught.value.problems)
    assert "distill.positions: robust distillation" in problems
    assert "distill.hidden_states: not available with adversarial.augment" in problems
    with pytest.raises(config.RecipeError) as caught:
        config.parse(base | {"adversarial": {"train": {}}}, "bad.yaml")
    assert "adversarial.train.method: set a method" in caught.value.problems[0]
    blind = {"data": base["data"] | {"template": "Positive or negative?"}}
    with pytest.raises(config.RecipeError) as caught:
        config.parse(blind | {"adversarial": {"augment": {}}}, "bad.yaml")
    assert caught.value.problems == [
        "data.template: the template never shows the row's input: add {text}"
    ]
    with pytest.raises(config.RecipeError) as caught:
        config.parse(base | {"adversarial": {}}, "bad.yaml")
    assert "adversarial: set augment, train or both" in caught.value.problems[0]
    with pytest.raises(config.RecipeError) as caught:
        config.parse(base | {"adversarial": {"augment": {"consistency": 1.0}}}, "bad.yaml")
    assert "adversarial.augment: consistency compares" in caught.value.problems[0]
    assert "mode: add" in caught.value.problems[0]


@pytest.mark.parametrize("teacher", ["online", "cached", "online, consistency"])
def test_robust_distillation_trains_on_perturbed_inputs(
    teacher: str, tiny_recipe, tiny_model_dir: Path
) -> None:
    overrides = [
        f"distill.teacher.name={tiny_model_dir}",
        "distill.student.from_teacher.keep_layers=[1]",
        "adversarial.augment.methods=[char,word]",
        "adversarial.augment.probability=1.0",
        # Distillation alone: with the task loss beside it, the random teacher's near-uniform
        # distributions lose to the labels and the distillation loss may rise while all works.
        "distill.alpha=1.0",
    ]
    if teacher == "cached":
        overrides.append("distill.cache.top_k=16")
    consistency = teacher.endswith("consistency")
    if consistency:
        overrides += ["adversarial.augment.mode=add", "adversarial.augment.consistency=1.0"]
    path = tiny_recipe(f"robust-{teacher.replace(', ', '-')}", max_steps=6, lr=5e-3)
    result = train.run(config.load(path, overrides), path)
    steps = [record for record in _metrics(result.run_dir) if "loss" in record]
    distill = [record["distill_loss"] for record in steps]
    assert len(distill) == 6
    assert all(value > 0 for value in distill)
    assert distill[-1] < distill[0]
    # The student's answers on each clean row and its perturbed copy are compared.
    assert all(("consistency_loss" in record) == consistency for record in steps)
    assert all(record.get("consistency_loss", 1) > 0 for record in steps)


def test_overrides_may_follow_options(tiny_recipe, capsys) -> None:
    path = str(tiny_recipe())
    assert cli.main(["augment", path, "--show", "1", "adversarial.augment.methods=[word]"]) == 0
    assert "· word" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stopped:
        cli.main(["augment", path, "--show", "1", "--bogus"])
    assert stopped.value.code == cli.USAGE_ERROR
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_misspellings_without_a_training_split_is_a_clear_error(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "validation.jsonl").write_text('{"text": "fine", "label": "positive"}\n')
    settings = schema.DataConfig(source=str(tmp_path), task="classification")
    formatter = data.TaskFormatter(settings, ["negative", "positive"])
    pool = schema.AugmentConfig(methods=["gradient"], gradient_candidates="misspellings")
    named = r"misspellings \(adversarial.augment or evaluation.robustness\) reads its lexicon"
    with pytest.raises(data.DataError, match=named + r".*no 'train' split"):
        augment.Augmenter(pool, formatter, tokenizer, None, 0, "no")


def test_conversations_are_refused_from_every_source_and_in_the_preview(
    cli_here, tiny_recipe, data_root: Path, tmp_path: Path
) -> None:
    sharegpt = data_root / "instruction" / "sharegpt_dummy"
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    rows = [{"prompt": f"What is {n} plus {n}?", "completion": str(2 * n)} for n in range(16)]
    (prompts / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = tiny_recipe()
    refused = (
        "adversarial.augment: perturbations rewrite the one prompt of a row, and "
        f"{sharegpt / 'train.jsonl'} holds sharegpt rows"
    )
    instruction = ["data.task=instruction", "validation={}", "adversarial.augment.methods=[char]"]
    # A mixed conversation was perturbed as its last prompt alone, its history and earlier
    # answers lost, and the preview showed conversations that training refuses.
    for source, mix in [(prompts, f"[{{source: {sharegpt}, weight: 0.5}}]"), (sharegpt, "[]")]:
        settings = [*instruction, f"data.source={source}", f"data.mix={mix}"]
        for command in (["train", str(path), *settings], ["augment", str(path), *settings]):
            assert refused in cli_here(*command, expect=2)
