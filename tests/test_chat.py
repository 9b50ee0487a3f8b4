"""`llama-tune chat`: one-shot and interactive answers, prompted as training prompted its rows."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

from conftest import CLI, REPO, TEST_DATA
from llama_tune import config, data
from llama_tune.chat import SINGLE_PROMPTS, Conversation, interactive


def _base_recipe(tmp_path: Path, **chat: str) -> Path:
    path = tmp_path / "base.yaml"
    # Conversations: rendered with the tokenizer's chat template, as training would.
    recipe = {
        "data": {"source": "unused", "task": "instruction", "format": "messages", "chat": chat},
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


def test_a_run_trained_on_plain_prompts_is_prompted_as_training_was(cli_here, tiny_recipe) -> None:
    path = tiny_recipe("plain", max_steps=1)
    cli_here("train", str(path))
    conversation = Conversation(path.parent / "plain", [])
    assert conversation.single_prompts
    trained = data.build(config.load(path).data, conversation.tokenizer).train.examples[0]
    # The task template with the label set, the text as the row's input, as training encoded it.
    prompt = trained.input_ids[: trained.prompt_length]
    assert conversation.prompt_ids(trained.fields["text"]) == prompt
    assert "one of: negative, positive." in conversation.tokenizer.decode(prompt)
    assert conversation.stop_strings == ["\n"]
    out = io.StringIO()
    interactive(conversation, ["a dull film .", "a fine film ."], out)
    assert SINGLE_PROMPTS in out.getvalue()
    assert out.getvalue().count("assistant: ") == 2
    # No history: the model never saw one.
    assert conversation.turns == []
    said = cli_here("chat", str(path.parent / "plain"), "--prompt", "a dull film .")
    assert SINGLE_PROMPTS in said
    # Task rows rendered as a user turn of a chat template, after the system prompt.
    chat_settings = ["data.chat.template=chatml", "data.chat.system_prompt=Be brief."]
    templated = tiny_recipe("templated", max_steps=1)
    cli_here("train", str(templated), *chat_settings)
    conversation = Conversation(templated.parent / "templated", [])
    assert conversation.single_prompts
    trained = data.build(config.load(templated, chat_settings).data, conversation.tokenizer)
    first = trained.train.examples[0]
    assert conversation.prompt_ids(first.fields["text"]) == first.input_ids[: first.prompt_length]
    assert "<|im_start|>system\nBe brief." in conversation.tokenizer.decode(first.input_ids)


def test_instruction_rows_are_prompted_in_the_format_training_read_from_them(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    rows = tmp_path / "rows.jsonl"
    recipe = tmp_path / "recipe.yaml"
    settings = {"source": str(rows), "task": "instruction"}
    recipe.write_text(json.dumps({"model": {"name": str(tiny_model_dir)}, "data": settings}))
    # The first row fits no format, and training skipped it: the next one says which it is.
    prompt_completion = [{"question": "?"}, {"prompt": "Say hi.", "completion": "Hi."}]
    rows.write_text("".join(json.dumps(row) + "\n" for row in prompt_completion))
    plain = Conversation(recipe, [])
    assert plain.single_prompts
    assert plain.prompt_ids("Say hi.") == plain.tokenizer("Say hi.")["input_ids"]
    messages = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]
    rows.write_text(json.dumps({"messages": messages}) + "\n")
    assert not Conversation(recipe, []).single_prompts


def test_a_run_is_prompted_as_trained_where_its_data_is_not(
    cli_here, tiny_recipe, tmp_path: Path
) -> None:
    rows = tmp_path / "rows"
    shutil.copytree(TEST_DATA / "sentiment", rows)
    path = tiny_recipe("copied", max_steps=1)
    cli_here("train", str(path), f"data.source={rows}")
    here = Conversation(path.parent / "copied", [])
    expected = here.prompt_ids("a fine film .")
    # The run copied to a machine without its data: its summary says what the rows were.
    shutil.rmtree(rows)
    elsewhere = Conversation(path.parent / "copied", [])
    assert elsewhere.prompt_ids("a fine film .") == expected
    assert "one of: negative, positive." in elsewhere.tokenizer.decode(expected)
