"""Reading recipes: shipped ones validate, broken ones fail with every problem named at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llama_tune import config, schema

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def test_recipes_are_shipped() -> None:
    names = {path.stem for path in RECIPES}
    assert {"quickstart", "sst2_lora", "trec_lora", "aeslc_lora", "multi30k_lora"} <= names
    assert "sst2_qlora" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.stem)
def test_every_shipped_recipe_validates(path: Path, data_root: Path) -> None:
    recipe = config.load(path)
    assert Path(recipe.data.source).exists(), recipe.data.source
    assert str(data_root) in recipe.data.source
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("#")
    assert "llama-tune" in path.read_text().split("\n\n")[0]


def _problems(tmp_path: Path, text: str, overrides: list[str] | None = None) -> list[str]:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(config.RecipeError) as caught:
        config.load(path, overrides)
    return caught.value.problems


@pytest.mark.parametrize("value", [".inf", ".nan"])
def test_numbers_must_be_finite(tmp_path: Path, value: str) -> None:
    # An infinite learning rate would pass its lower bound and train into NaN losses.
    recipe = (
        f"model: {{name: x}}\ndata: {{source: y, task: classification}}\ntrain: {{lr: {value}}}\n"
    )
    assert _problems(tmp_path, recipe) == ["train.lr: Input should be a finite number"]


@pytest.mark.parametrize("layers", ["[]", "[-1]", "[3, 3]"])
def test_adapted_layers_are_named_once_from_zero(tmp_path: Path, layers: str) -> None:
    problems = _problems(tmp_path, f"model: {{name: x}}\nadapter: {{layers: {layers}}}\n")
    assert any(problem.startswith("adapter.layers") for problem in problems), problems


def test_what_compiled_layers_are_not_measured_with_is_refused(tmp_path: Path) -> None:
    recipe = """
model: {name: x, compile: true, quantization: 4bit}
data: {source: /data, task: classification}
distill: {teacher: {name: y, compile: true}}
adversarial: {train: {method: pgd}}
"""
    problems = _problems(tmp_path, recipe)
    assert {problem.split(":")[0] for problem in problems} == {
        "model.compile",
        "distill.teacher.compile",
    }
    assert any("quantised base" in problem for problem in problems)
    assert any("adversarial.train.method (pgd)" in problem for problem in problems)


def test_every_problem_is_named_at_once(tmp_path: Path) -> None:
    problems = _problems(
        tmp_path,
        """
model: {name: x, dtype: fp8, colour: blue}
adapter: {r: 0, target_modules: []}
data: {source: /data, task: classification, template: "{txt}", fields: {doc: body}}
train: {lr: -1, precision: fp64, save_steps: 5}
logging: {trackers: [mlflow]}
""",
    )
    keys = {problem.split(":")[0] for problem in problems}
    assert keys == {
        "model.dtype",
        "model.colour",
        "adapter.r",
        "adapter.target_modules",
        "data.template",
        "data.fields",
        "train.lr",
        "train.save_steps",
        "logging.trackers.0",
        "train.precision",
    }
    assert "train.save_steps: moved to checkpoint.every" in problems
    assert any("unknown key" in problem for problem in problems)
    assert any("'txt'" in problem for problem in problems)


def test_missing_required_section_and_bad_task(tmp_path: Path) -> None:
    assert _problems(tmp_path, "model: {name: x}\n") == ["data: Field required"]
    problems = _problems(tmp_path, "data: {source: /d, task: poetry}\n")
    assert len(problems) == 1
    assert problems[0].startswith("data.task:")


def test_not_a_mapping_and_not_yaml(tmp_path: Path) -> None:
    assert "mapping" in _problems(tmp_path, "- a\n- b\n")[0]
    assert "not valid YAML" in _problems(tmp_path, "data: {source: [\n")[0]
    with pytest.raises(config.RecipeError, match="file not found"):
        config.load(tmp_path / "absent.yaml")


def test_overrides_are_validated_like_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("data: {source: /d, task: classification}\n")
    recipe = config.load(
        path, ["train.lr=1e-4", "data.max_length=256", "adapter.target_modules=[q_proj]"]
    )
    assert recipe.train.lr == 1e-4
    assert recipe.data.max_length == 256
    assert recipe.adapter.target_modules == ["q_proj"]
    problems = _problems(
        tmp_path,
        path.read_text(),
        ["train.batch_size=many", "nokey", "train.nope=1", "data.source.x=1"],
    )
    assert problems[0] == "override 'nokey': expected dotted.key=value"
    assert any(problem.startswith("override data.source.x") for problem in problems)
    assert any(problem.startswith("train.batch_size:") for problem in problems)
    assert "train.nope: unknown key" in problems


def test_environment_variables_expand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_DATA", "/somewhere")
    monkeypatch.delenv("UNSET_DATA", raising=False)
    path = tmp_path / "env.yaml"
    path.write_text(
        "data: {source: '${MY_DATA}/sst2', task: translation,"
        " languages: {source: '${UNSET_DATA:-en}'}}\n"
    )
    recipe = config.load(path)
    assert recipe.data.source == "/somewhere/sst2"
    assert recipe.data.languages.source == "en"
    problems = _problems(tmp_path, "data: {source: '${UNSET_DATA}/x', task: classification}\n")
    assert problems == ["data.source: environment variable UNSET_DATA is not set"]


def test_epochs_or_steps_required(tmp_path: Path) -> None:
    problems = _problems(
        tmp_path, "data: {source: /d, task: classification}\ntrain: {epochs: null}\n"
    )
    assert problems == ["train.epochs: set epochs or train.max_steps"]


def test_resolved_recipe_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("data: {source: /d, task: translation, languages: {source: en}}\n")
    recipe = config.load(path)
    again = tmp_path / "again.yaml"
    again.write_text(config.to_yaml(recipe))
    assert config.load(again) == recipe
    assert config.run_dir(recipe, path) == Path("runs/r")


def test_cli_validate_reports_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {source: /d, task: classification}\ntrain: {batch_size: 0, lr: x}\n")
    good = RECIPES[0]
    done = subprocess.run(
        [sys.executable, "-m", "llama_tune", "validate", str(good), str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert f"ok: {good}" in done.stdout
    assert "train.batch_size" in done.stderr
    assert "train.lr" in done.stderr
    assert "Traceback" not in done.stderr


def test_best_adapter_keys_are_checked_together(tmp_path: Path) -> None:
    summarisation = "data: {source: d, task: summarisation}\n"
    wrong = "validation: {best_metric: accuracy, every: 5}"
    assert _problems(tmp_path, summarisation + wrong) == [
        "validation.best_metric: 'accuracy' is not one of eval_loss, rouge1, rouge2, rougeL, "
        "rougeLsum"
    ]
    assert _problems(tmp_path, summarisation + "validation: {best_metric: rougeL}") == [
        "validation.best_metric: rougeL needs validation.metric_rows",
        "validation.best_metric: needs validation.every",
    ]
    no_validation = (
        "data: {source: d, task: classification, splits: {validation: null}}\n"
        "validation: {every: 5, metric_rows: 10}\nevaluation: {adapter: best}\n"
    )
    assert _problems(tmp_path, no_validation) == [
        "validation.metric_rows: needs a validation split (data.splits.validation)",
        "evaluation.adapter: 'best' needs validation.best_metric",
    ]
    fine = "data: {source: d, task: translation}\nvalidation: {every: 5, metric_rows: 10}\n"
    path = tmp_path / "fine.yaml"
    path.write_text(fine)
    recipe = config.load(path, ["validation.best_metric=chrf"])
    assert recipe.validation.best_metric == "chrf"


def test_an_override_below_a_null_section_turns_it_on(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("data: {source: d, task: classification}\nevaluation: {robustness: null}\n")
    recipe = config.load(path, ["evaluation.robustness.strengths=[0.3]"])
    assert recipe.evaluation.robustness is not None
    assert recipe.evaluation.robustness.strengths == [0.3]
    assert recipe.evaluation.robustness.methods == ["char", "gradient"]


def test_moved_keys_name_their_new_home(tmp_path: Path) -> None:
    recipe = "data: {source: d, task: classification}\ntrain: {lr: 1.0e-4}\n"
    problems = _problems(tmp_path, recipe, [f"{old}=3" for old in schema.MOVED_KEYS])
    assert problems == [f"{old}: moved to {new}" for old, new in schema.MOVED_KEYS.items()]
    for new in schema.MOVED_KEYS.values():
        section: type = schema.Recipe
        for key in new.split("."):
            assert key in section.model_fields
            section = section.model_fields[key].annotation


def test_a_student_built_from_the_teacher_takes_its_name(tmp_path: Path) -> None:
    path = tmp_path / "distill.yaml"
    path.write_text(
        "data: {source: d, task: classification}\n"
        "distill: {teacher: {name: /teachers/big, revision: v2}, "
        "student: {from_teacher: {every: 2}}}\n"
    )
    recipe = config.load(path)
    assert (recipe.model.name, recipe.model.revision) == ("/teachers/big", "v2")


def test_data_sources_and_formats_that_do_not_fit_are_named(tmp_path: Path) -> None:
    problems = _problems(
        tmp_path,
        "data: {source: {hub: someone/data, configuration: x}, task: classification,"
        " splits: {validation: null, validation_fraction: 0.1}}\n",
    )
    assert problems == [
        "data.source.configuration: unknown key",
        "data.splits.validation_fraction: holds rows out for splits.validation, not null",
    ]
    problems = _problems(
        tmp_path,
        "data: {source: d, task: classification, format: messages, chat: {system_prompt: Hi}}\n",
    )
    assert problems == [
        "data.format: classification rows have the task's fields; only instruction recipes take "
        "a format",
        "data.chat.system_prompt: needs a chat.template to put it in",
    ]
    path = tmp_path / "hub.yaml"
    path.write_text("data: {source: {hub: nyu-mll/glue, config: sst2}, task: classification}\n")
    assert str(config.load(path).data.source) == "nyu-mll/glue/sst2"


@pytest.mark.usefixtures("data_root")
def test_a_run_folder_keeps_its_output_dir(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / config.RECIPE_COPY).write_text(RECIPES[0].read_text())
    moved = tmp_path / "moved"
    assert config.load_run(run, ["train.lr=0.001"]).output.dir == str(run)
    for override in (f"output.dir={moved}", f" output.dir ={moved}"):
        with pytest.raises(config.UserError, match=rf"the run lives in its folder {run}"):
            config.load_run(run, [override])


@pytest.mark.usefixtures("data_root")
def test_an_empty_string_is_named(tmp_path: Path) -> None:
    text = RECIPES[0].read_text()
    assert _problems(tmp_path, text, ["model.name=''", "data.fields.text=''"]) == [
        "model.name: empty; give a value",
        "data.fields.text: empty; give a value",
    ]
    assert _problems(tmp_path, text, ["data.source=''"]) == ["data.source: empty; give a value"]
    # Where a key may be null, empty means null (`revision: ${REV:-}`).
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    recipe = config.load(path, ["model.revision=''", "data.splits.test=''"])
    assert (recipe.model.revision, recipe.data.splits.test) == (None, None)


def test_local_paths_are_made_absolute_where_they_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "chat.jinja").write_text("{{ messages }}")
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "model: {name: models/mine}\n"
        "data: {source: data, task: instruction, chat: {template: chat.jinja},"
        " mix: [{source: ./data, weight: 0.5}, {source: someone/hub-data, weight: 0.2}]}\n"
        "distill: {teacher: {name: smollm2-135m-instruct, adapter: ~/no-such-adapter}}\n"
    )
    recipe = config.load(path)
    assert recipe.model.name == str(tmp_path / "models" / "mine")
    assert recipe.data.source == recipe.data.mix[0].source == str(tmp_path / "data")
    assert recipe.data.chat.template == str(tmp_path / "chat.jinja")
    # A Hub id, a built-in name and a missing path are left for the loaders to name.
    assert recipe.data.mix[1].source == "someone/hub-data"
    assert recipe.distill.teacher.name == "smollm2-135m-instruct"
    assert recipe.distill.teacher.adapter == "~/no-such-adapter"


def test_a_teacher_must_be_named(tmp_path: Path) -> None:
    # ModelConfig's default name would make the built-in model the teacher without a word.
    problems = _problems(
        tmp_path, "data: {source: d, task: classification}\ndistill: {teacher: {dtype: float32}}\n"
    )
    assert problems == ["distill.teacher.name: Field required"]


@pytest.mark.parametrize(
    ("layers", "problem"),
    [
        ("{}", "map at least one student layer to a teacher layer, or null"),
        ("{1: -1}", "layers count from 0 (the embeddings)"),
    ],
)
def test_a_hidden_state_map_names_layers_that_exist(
    tmp_path: Path, layers: str, problem: str
) -> None:
    # An empty map trained with a hidden loss of 0; a negative layer failed after loading.
    problems = _problems(
        tmp_path,
        "data: {source: d, task: classification}\n"
        f"distill: {{teacher: {{name: t}}, hidden_states: {{layers: {layers}}}}}\n",
    )
    assert problems == [f"distill.hidden_states.layers: {problem}"]


def test_label_tokens_only_is_not_combined_with_every_position(tmp_path: Path) -> None:
    # label_tokens_only distilled the label's first position alone, whatever positions said.
    problems = _problems(
        tmp_path,
        "data: {source: d, task: classification}\n"
        "distill: {teacher: {name: t}, label_tokens_only: true, positions: all}\n",
    )
    assert problems == [
        "distill.positions: all distils every position, label_tokens_only only the label's "
        "first; choose one"
    ]


def test_beta_is_refused_for_a_loss_that_ignores_it(tmp_path: Path) -> None:
    recipe = "data: {source: d, task: classification}\ndistill: {teacher: {name: t}, beta: 0.2}\n"
    problems = _problems(tmp_path, recipe)
    assert problems == [
        "distill.beta: weighs the jsd mixture only, and distill.loss is forward_kl; set loss: jsd "
        "or leave beta out"
    ]
    path = tmp_path / "jsd.yaml"
    path.write_text(
        "data: {source: d, task: classification}\n"
        "distill: {teacher: {name: t}, beta: 0.2, loss: jsd}\n"
    )
    assert config.load(path).distill.beta == 0.2


def test_a_layer_kept_twice_is_refused(tmp_path: Path) -> None:
    # Kept twice, a teacher layer left one of the student's unfilled: a state-dict traceback.
    problems = _problems(
        tmp_path,
        "data: {source: d, task: classification}\n"
        "distill: {teacher: {name: t}, student: {from_teacher: {keep_layers: [0, 2, 0]}}}\n",
    )
    assert problems == ["distill.student.from_teacher.keep_layers: name each kept layer once"]


def test_a_mixed_source_may_not_train_on_the_rows_scored(tmp_path: Path) -> None:
    # The main source's validation or test split mixed in was trained on, then scored as
    # unseen rows; another source's split of the same name is fine.
    problems = _problems(
        tmp_path,
        "data: {source: d, task: classification, splits: {validation: dev, test: test},\n"
        "  mix: [{source: d, split: dev, weight: 0.1}, {source: d, split: test, weight: 0.1},\n"
        "        {source: e, split: test, weight: 0.1}]}\n",
    )
    assert problems == [
        "data.mix.0.split: dev holds the main source's validation rows, which would be trained "
        "on and then scored",
        "data.mix.1.split: test holds the main source's test rows, which would be trained on and "
        "then scored",
    ]
