"""`llama-tune push` against a local stand-in for the Hub, driven by the real huggingface_hub
client: the right files arrive, the card's metadata parses as the Hub's, the token goes only
into the Authorization header, and failures are one line that change nothing."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
from huggingface_hub import ModelCard, constants
from transformers import AutoModelForCausalLM

from conftest import write_tiny_recipe
from hub_stand_in import HubStandIn
from llama_tune import config, evaluation, model_card, models, publish, train
from llama_tune.jsonfiles import read_json
from llama_tune.report import format_interval
from llama_tune.schema import ModelConfig

TOKEN = "hf_stand_in_secret_token_1234"


def _contents(folder: Path) -> dict[str, str]:
    """Every file under `folder` by its relative path, as a digest of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def evaluated_run(tiny_recipe) -> Path:
    """A short run, scored against its base on the validation split."""
    path = tiny_recipe("evaluated", max_steps=4, lr=5e-2)
    run_dir = train.run(config.load(path, []), path).run_dir
    evaluation.run(run_dir, split="validation", base=True)
    return run_dir


@pytest.fixture
def hub_online(monkeypatch: pytest.MonkeyPatch):
    """Factory: a stand-in Hub the in-process client talks to, with the token in HF_TOKEN."""

    def start(fail_with: int | None = None) -> HubStandIn:
        hub = HubStandIn(fail_with)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", hub.__enter__().url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        return hub

    return start


def test_a_push_sends_the_run_with_its_card_and_the_token_only_as_authorization(
    evaluated_run: Path, cli
) -> None:
    before = _contents(evaluated_run)
    with HubStandIn() as hub:
        environment = {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0"}
        done = cli(
            "push", str(evaluated_run), "--repo-id", "someone/tiny-sentiment", "--private",
            "--revision", "v1", "--commit-message", "first version", env=environment,
        )  # fmt: skip
    assert hub.repos["someone/tiny-sentiment"]["private"] is True
    assert hub.commits[-1]["message"] == "first version"
    sent = hub.files("someone/tiny-sentiment", "v1")
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert sent[Path(name).name] == (evaluated_run / name).read_bytes()
    assert sent["recipe.yaml"] == (evaluated_run / "recipe.yaml").read_bytes()
    for name in ("results.json", "report.md", "report.html", "metrics.png"):
        published = sent[f"evaluation/validation/{name}"]
        assert published == (evaluated_run / "evaluation/validation" / name).read_bytes()
    assert not any(name.startswith("evaluation/") and "predictions" in name for name in sent)
    card = ModelCard(sent["README.md"].decode(), ignore_metadata_errors=False)
    results = read_json(evaluated_run / "evaluation/validation/results.json")
    published_metrics = {entry.metric_type: entry.metric_value for entry in card.data.eval_results}
    assert published_metrics == {
        name: round(interval["value"], 4)
        for name, interval in results["systems"]["tuned"]["metrics"].items()
    }
    assert card.data.library_name == "peft"
    assert {"llama-tune", "lora"} <= set(card.data.tags)
    assert "| base |" in card.text
    for request in hub.requests:
        assert TOKEN.encode() not in request.body
        holding = [name for name, value in request.headers.items() if TOKEN in value]
        assert holding in ([], ["authorization"]), request.path
    assert sum("authorization" in request.headers for request in hub.requests) >= 3
    assert TOKEN not in done.stdout + done.stderr
    assert all(TOKEN.encode() not in content for content in sent.values())
    assert _contents(evaluated_run) == before, "the run folder changed"


def test_the_card_names_the_builtin_models_origin_license_and_robustness(
    evaluated_run: Path,
) -> None:
    noise = ["evaluation.robustness.methods=[char]", "evaluation.robustness.strengths=[0.3]"]
    scored = evaluation.run(evaluated_run, noise, split="validation", base=True)
    recipe = config.load_run(evaluated_run, ["model.name=smollm2-135m-instruct"])
    publication = model_card.Publication(
        repo_id="someone/smol-sentiment",
        recipe=recipe,
        summary=read_json(evaluated_run / "summary.json"),
        results=[read_json(evaluated_run / "evaluation/validation/results.json")],
        merged=False,
        license="apache-2.0",
    )
    card = ModelCard(str(model_card.build(publication)), ignore_metadata_errors=False)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.license == "apache-2.0"
    entry = card.data.eval_results[0]
    assert (entry.task_type, entry.dataset_split) == ("text-classification", "validation")
    assert 'PeftModel.from_pretrained(base, "someone/smol-sentiment")' in card.text
    for system in ("tuned", "base"):
        (record,) = scored["systems"][system]["robustness"]
        drop = format_interval(record["drop"]["accuracy"])
        assert f"| {system} | char | 0.3 | {record['changed']} |" in card.text
        assert f"| {drop} |" in card.text


def test_a_base_from_the_hub_cache_is_published_as_its_repository_and_commit(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `hf download someone/tiny-llama` prints the snapshot's folder, which users pass as the
    # base: the adapter names the repository and commit, which load on any machine.
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-llama" / "snapshots" / commit
    shutil.copytree(tiny_model_dir, snapshot)
    path = write_tiny_recipe(tmp_path, snapshot, max_steps=1)
    run_dir = train.run(config.load(path, []), path).run_dir
    assert (
        read_json(run_dir / "summary.json")["base_model"]["portable_name"] == "someone/tiny-llama"
    )
    folder = tmp_path / "to-publish"
    capsys.readouterr()  # what training printed
    publish.push(publish.PushRequest(run_dir, "someone/x", dry_run=True, output=folder))
    assert "warning" not in capsys.readouterr().err
    card = ModelCard((folder / "README.md").read_text(), ignore_metadata_errors=False)
    assert card.data.base_model == "someone/tiny-llama"
    assert f"`someone/tiny-llama` at revision `{commit}`" in card.text
    # Offline, from the cache alone: the name and commit the adapter gives load its base.
    adapter = peft.AutoPeftModelForCausalLM.from_pretrained(folder, cache_dir=cache)
    settings = json.loads((folder / "adapter_config.json").read_text())
    assert (settings["base_model_name_or_path"], settings["revision"]) == (
        "someone/tiny-llama",
        commit,
    )
    trained = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    base = adapter.get_base_model().state_dict()
    torch.testing.assert_close(base["model.norm.weight"], trained["model.norm.weight"])
    # A folder merely named like one stays a local folder.
    (cache / "elsewhere" / "snapshots").mkdir(parents=True)
    lookalike = shutil.copytree(tiny_model_dir, cache / "elsewhere" / "snapshots" / commit)
    assert models.portable_base(ModelConfig(name=str(lookalike))) == (str(lookalike), None)


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (401, "HTTP 401 (the token is invalid or expired)"),
        (403, "HTTP 403 (the token may not write to this repository or namespace)"),
    ],
)
def test_a_refused_push_is_one_line_and_changes_nothing(
    evaluated_run: Path, cli_here, hub_online, status: int, message: str
) -> None:
    before = _contents(evaluated_run)
    hub = hub_online(fail_with=status)
    try:
        err = cli_here("push", str(evaluated_run), "--repo-id", "someone/x", expect=2)
    finally:
        hub.__exit__(None, None, None)
    warning, failure = err.strip().splitlines()  # the local base is warned of first
    assert warning.startswith("warning: the base model is the local folder")
    assert failure.startswith(f"error: push to someone/x failed: {message}")
    assert TOKEN not in err
    assert _contents(evaluated_run) == before


def test_a_push_without_a_hub_or_a_token_says_so(
    evaluated_run: Path, cli_here, hub_online, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hub = hub_online()
    hub.__exit__(None, None, None)  # the server is gone: nothing listens at its address
    err = cli_here("push", str(evaluated_run), "--repo-id", "someone/x", expect=2)
    assert "failed: cannot reach the Hub" in err
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    err = cli_here("push", str(evaluated_run), "--repo-id", "someone/x", expect=2)
    assert "no Hugging Face token: set HF_TOKEN" in err
    err = cli_here("push", str(evaluated_run), "--repo-id", "not a repo", expect=2)
    assert "--repo-id not a repo: expected OWNER/NAME" in err


def test_a_dry_run_writes_the_folder_and_lists_it(
    evaluated_run: Path, cli_here, tmp_path: Path
) -> None:
    folder = tmp_path / "to-publish"
    # best/'s evaluation (as `evaluate RUN evaluation.adapter=best` writes it) is not about
    # the final adapter published here.
    evaluations = evaluated_run / "evaluation"
    shutil.copytree(evaluations / "validation", evaluations / "validation-best")
    request = publish.PushRequest(evaluated_run, "someone/x", dry_run=True, output=folder)
    listed = publish.describe(publish.push(request))
    size = (folder / "adapter_model.safetensors").stat().st_size
    assert f"{size:,d}  adapter_model.safetensors" in listed
    assert (folder / "README.md").is_file()
    assert json.loads((folder / "evaluation/validation/results.json").read_text())["n"] > 0
    assert [path.name for path in (folder / "evaluation").iterdir()] == ["validation"]
    again = ["--dry-run", "--output", str(folder)]
    err = cli_here("push", str(evaluated_run), "--repo-id", "someone/x", *again, expect=2)
    assert f"{folder} already exists and is not empty; give --output a new or empty" in err
    under_a_file = folder / "README.md" / "x"
    again = ["--dry-run", "--output", str(under_a_file)]
    err = cli_here("push", str(evaluated_run), "--repo-id", "someone/x", *again, expect=2)
    assert f"--output {under_a_file}: {folder / 'README.md'} is a file, not a folder" in err
