"""`llama-tune chat`: one-shot and interactive answers with the recipe's chat template."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from conftest import CLI, REPO


def _base_recipe(tmp_path: Path, **chat: str) -> Path:
    path = tmp_path / "base.yaml"
    recipe = {
        "data": {"source": "unused", "task": "instruction", "chat": chat},
        "evaluation": {"max_new_tokens": 24},
        "output": {"dir": str(tmp_path / "base")},
    }
    path.write_text(json.dumps(recipe))
    return path


def test_one_answer_from_the_built_in_model(cli, tmp_path: Path) -> None:
    path = _base_recipe(tmp_path)
    done = cli("chat", str(path), "--prompt", "What is the capital of France?")
    assert "Paris" in done.stdout
    assert "<|im" not in done.stdout


def test_an_interactive_session_remembers_earlier_turns_until_reset(tmp_path: Path) -> None:
    path = _base_recipe(tmp_path, system_prompt="You are a helpful assistant.")
    question = "In which city do I live?"
    lines = f"I live in Paris.\n{question}\n/reset\n{question}\n"
    done = subprocess.run(
        [*CLI, "chat", str(path)],
        input=lines,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answers = [line for line in done.stdout.splitlines() if line.startswith("assistant: ")]
    assert len(answers) == 3
    # The second answer sees the first turn; after the reset the same question does not.
    assert "Paris" in answers[1]
    assert "Paris" not in answers[2]
    assert "(conversation reset)" in done.stdout


def test_a_run_folder_answers_with_its_adapter(cli, cli_here, tiny_recipe, data_root: Path) -> None:
    source = data_root / "instruction" / "sharegpt_dummy"
    path = tiny_recipe("chat-run", max_steps=1, lr=1e-5)
    settings = [f"data.source={source}", "data.task=instruction", "data.max_train_rows=8"]
    cli_here("train", str(path), "model.name=smollm2-135m-instruct", *settings)
    done = cli("chat", str(path.parent / "chat-run"), "--prompt", "What is the capital of France?")
    assert "Paris" in done.stdout
    missing = cli_here("chat", str(path.parent / "nothing-here"), "--prompt", "Hi", expect=2)
    assert missing.startswith("error: ")
