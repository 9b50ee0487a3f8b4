"""The real CLI end to end: train, stop with a signal, resume, launch through Accelerate."""

from __future__ import annotations

import ast
import inspect
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import CLI, REPO, expected_malloc
from llama_tune import allocator
from llama_tune import cli as cli_module


def _metric_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_train_prints_the_run_and_the_adapter_loads(cli, tiny_recipe, tiny_model_dir: Path) -> None:
    path = tiny_recipe(max_steps=4)
    overrides = ["evaluation.after_training=true", "evaluation.split=validation"]
    done = cli("train", str(path), "train.lr=2e-3", *overrides, "evaluation.max_rows=24")
    run_dir = path.parent / "run"
    assert f"run folder:  {run_dir}" in done.stdout
    assert f"adapter:     {run_dir / 'adapter'}" in done.stdout
    assert "eval loss:" in done.stdout
    assert "train loss:" in done.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["versions"]["malloc"] == expected_malloc()
    assert "24 examples scored" in done.stdout
    assert "tuned - base accuracy:" in done.stdout
    assert (run_dir / "evaluation" / "validation" / "report.html").is_file()

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir / "adapter"
    )
    trained = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert trained
    assert all(p.abs().sum() > 0 for p in trained)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_then_resume_equals_an_uninterrupted_run(
    cli_here, tiny_recipe, same_weights, signum: int, code: int
) -> None:
    # Dropout on, so the resumed run must also restore the RNG state to match.
    overrides = ["adapter.dropout=0.1", "train.max_steps=80", "train.warmup_steps=5"]
    straight = tiny_recipe("straight")
    cli_here("train", str(straight), *overrides)

    stopped = tiny_recipe("stopped")
    run_dir = stopped.parent / "stopped"
    process = subprocess.Popen(
        [*CLI, "train", str(stopped), *overrides],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while _metric_lines(run_dir) < 10 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == code, stderr[-3000:]
    assert "checkpoint saved" in stderr
    assert "Traceback" not in stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert 10 <= summary["state"]["step"] < 80

    # The hint resumes from the run folder alone: the overrides (80 steps where the recipe
    # says 8) come from the run's saved recipe.
    hint = f"continue with: llama-tune train {run_dir} --resume"
    assert hint in stderr
    cli_here(*hint.removeprefix("continue with: llama-tune ").split())
    same_weights(straight.parent / "straight" / "adapter", run_dir / "adapter")
    losses = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in losses if "loss" in record] == list(range(1, 81))


def test_user_mistakes_exit_2_without_traceback(cli, cli_here, tiny_recipe, tmp_path: Path) -> None:
    path = tiny_recipe()
    # The real command, in a process of its own: the mistake is one line, no traceback.
    for args, message in [
        (["train", str(path), "model.name=/no/such/model"], "built-in models: smollm2-135m"),
        (["train", str(path), "train.batch_size=0", "adapter.r=-1"], "train.batch_size"),
    ]:
        done = cli(*args, expect=2)
        assert message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
    # The same handling in this process, for the other mistakes (a traceback would fail here).
    cases = [
        (["train", str(path), "data.source=/no/such/data"], "data source /no/such/data"),
        (["train", str(tmp_path / "absent.yaml")], "file not found"),
        (["train", str(path), "--data", str(tmp_path / "none")], "no such folder"),
        (["train", str(path), "--resume"], "holds no run to resume; drop --resume"),
        (["train", str(tmp_path)], "a folder, not a recipe file"),
        (["validate", str(tmp_path)], "a folder, not a recipe file"),
        (["validate", str(path), "train.max_steps=abc"], "not overrides: train.max_steps=abc"),
        (["train", str(tmp_path), "--resume"], "is not a run folder"),
        (["train", str(path), "--resume", "--overwrite"], "choose one"),
    ]
    for args, message in cases:
        assert message in cli_here(*args, expect=2), args
    # A run stopped before its first checkpoint.
    (path.parent / "run").mkdir()
    (path.parent / "run" / "summary.json").write_text('{"status": "running"}')
    assert "no complete checkpoint" in cli_here("train", str(path), "--resume", expect=2)


IMPORT_PROBE = """
import gc, json, sys
from llama_tune import cli
before = gc.get_stats()[2]["collections"]
sys.argv = ["llama-tune", "evaluate", "no-such-run"]
code = cli.console()
collections = gc.get_stats()[2]["collections"] - before
loaded = "torch" in sys.modules
print(json.dumps([code, collections, gc.get_freeze_count(), gc.isenabled(), loaded]))
"""


def test_the_command_imports_without_collecting_and_freezes_what_it_imported(cli) -> None:
    # Importing torch and transformers, the collector walked their half a million objects in
    # 8 full collections, then once more at the exit: 2.7 s of a launched run's 6.5 s a process.
    done = cli(command=[sys.executable, "-c", IMPORT_PROBE])
    code, collections, frozen, enabled, imported = json.loads(done.stdout.splitlines()[-1])
    assert (code, imported) == (2, True)  # the run is missing once evaluation has imported
    assert collections == 0
    assert frozen > 100_000
    assert enabled


def test_every_verb_that_imports_is_imported_without_collecting() -> None:
    # A verb missing from VERB_MODULES would import its libraries with the collector on.
    for verb, handler in cli_module.HANDLERS.items():
        imports = [
            node
            for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(handler))))
            if isinstance(node, ast.ImportFrom)
        ]
        imported = {f"{node.module}.{alias.name}" for node in imports for alias in node.names}
        assert (verb in cli_module.VERB_MODULES) == bool(imports), verb
        assert not imports or cli_module.VERB_MODULES[verb] in imported | {imports[0].module}


def test_the_allocator_setting_is_checked_before_anything_runs(cli) -> None:
    wrong = cli("--version", expect=2, env={allocator.SETTING: "/no/such/libtcmalloc.so"})
    assert "LLAMA_TUNE_ALLOCATOR=/no/such/libtcmalloc.so: no such file" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    assert "llama-tune" in cli("--version", env={allocator.SETTING: "system"}).stdout


def test_accelerate_launch_runs_the_same_recipe(cli, tiny_recipe) -> None:
    path = tiny_recipe(max_steps=3)
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    cli(
        "--config_file",
        "configs/cpu.yaml",
        "-m",
        "llama_tune",
        "train",
        str(path),
        command=launch,
    )
    summary = json.loads((path.parent / "run" / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["processes"] == 1


def test_a_sharding_launch_stops_before_any_model_loads(cli, tiny_recipe) -> None:
    # What `accelerate launch` with an FSDP config sets in every process.
    path = tiny_recipe()
    done = cli("train", str(path), expect=2, env={"ACCELERATE_USE_FSDP": "true"})
    assert "error: the launch config asks for FSDP" in done.stderr
    assert "Traceback" not in done.stderr
    assert "Loading weights" not in done.stderr
    assert not (path.parent / "run").exists()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_launch_config_loads_in_accelerate_and_names_its_command(path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    settings = load_config_from_file(str(path))
    assert settings.compute_environment == "LOCAL_MACHINE"
    header = "".join(line for line in path.read_text().splitlines(True) if line.startswith("#"))
    assert f"--config_file configs/{path.name}" in header
    assert "-m llama_tune train RECIPE" in header


def test_evaluate_a_trained_run_against_its_base(
    cli, cli_here, tiny_recipe, tmp_path: Path
) -> None:
    path = tiny_recipe(max_steps=6, lr=5e-3)
    cli_here("train", str(path))
    run_dir = path.parent / "run"
    done = cli("evaluate", str(run_dir), "--split", "validation", "--limit", "24", "--base")
    assert "validation: " in done.stdout
    assert "24 to score" in done.stdout
    assert "24 examples scored" in done.stdout
    # A progress bar per system scored.
    assert "score tuned: 100%" in done.stderr
    assert "score base: 100%" in done.stderr
    assert "tuned - base accuracy:" in done.stdout
    out = run_dir / "evaluation" / "validation"
    results = json.loads((out / "results.json").read_text())
    predictions = [
        json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(predictions) == results["n"] == 24
    accuracy = sum(p["prediction"] == p["reference"] for p in predictions) / len(predictions)
    assert results["systems"]["tuned"]["metrics"]["accuracy"]["value"] == accuracy
    assert set(results["systems"]) == {"tuned", "base"}

    compared = cli("report", str(run_dir), "--output", str(tmp_path / "comparison"))
    assert "run (tuned, validation): accuracy" in compared.stdout
    page = (tmp_path / "comparison" / "report.html").read_text()
    assert "run (base, validation)" in page
    assert "data:image/png;base64," in page

    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    assert "is not a run folder" in cli_here("evaluate", str(not_a_run), expect=2)
    assert "no evaluation results" in cli_here("report", str(not_a_run), expect=2)


def test_chat_data_trains_and_scores_its_last_answers(cli, tiny_recipe, data_root: Path) -> None:
    source = data_root / "instruction" / "sharegpt_dummy"
    path = tiny_recipe("chat", max_steps=4)
    settings = [f"data.source={source}", "data.task=instruction", "data.max_train_rows=32"]
    settings += ["data.chat.system_prompt=Be brief.", "evaluation.after_training=true"]
    settings += ["evaluation.max_rows=6", "evaluation.max_new_tokens=4"]
    done = cli("train", str(path), *settings)
    assert "6 examples scored" in done.stdout
    results_dir = path.parent / "chat" / "evaluation" / "test"
    results = json.loads((results_dir / "results.json").read_text())
    for system in ("tuned", "base"):
        metrics = results["systems"][system]["metrics"]
        assert set(metrics) == {"rougeL", "chrf", "exact_match"}
        assert all(0 <= metrics[name]["low"] <= metrics[name]["high"] for name in metrics)
    rows = [
        json.loads(line) for line in (results_dir / "predictions.jsonl").read_text().splitlines()
    ]
    test_rows = (source / "test.jsonl").read_text().splitlines()
    for row in rows:
        turns = json.loads(test_rows[row["row"] - 1])["conversations"]
        assert row["input"] == turns[-2]["value"]
        assert row["references"] == [turns[-1]["value"]]
    report = (results_dir / "report.md").read_text()
    samples = report.split("## Sample answers", 1)[1].split("\n## ", 1)[0]
    assert samples.count("\n| ") == 1 + 5  # the header and the first five rows
    assert f"| {rows[0]['row']} | {rows[0]['input']} | {rows[0]['reference']} |" in samples

    augmented = cli(
        "train",
        str(path),
        *settings[:3],
        "--overwrite",
        "adversarial.augment.methods=[char]",
        expect=2,
    )
    assert "adversarial.augment: perturbations rewrite the one prompt" in augmented.stderr
    assert "Traceback" not in augmented.stderr
    # The refused run put the finished one back as it was.
    assert json.loads((results_dir / "results.json").read_text()) == results
