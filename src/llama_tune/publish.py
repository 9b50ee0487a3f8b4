"""`llama-tune push`: a run published to the Hugging Face Hub.

The repository folder is assembled outside the run folder: the adapter (or, with `merged`,
the exported standalone model), the tokenizer, the resolved recipe, each evaluated split's
results.json, reports and plots, and a model card. It is then uploaded as one commit with
huggingface_hub. The token comes from HF_TOKEN or the Hub login and goes nowhere but the
client's Authorization header: not into a file, a log line or an error message. A failed push
changes nothing in the run folder; a dry run writes the folder and lists what would go up.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError

from llama_tune import evaluation, export, harness, model_card, models, schema
from llama_tune.errors import UserError, first_line
from llama_tune.jsonfiles import read_json
from llama_tune.run_folder import (
    BEST,
    EVALUATION,
    LM_EVAL,
    RECIPE_COPY,
    RESULTS,
    SUMMARY,
    check_can_create,
    evaluates_best,
    holds_something,
)

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
EVALUATION_FILES = (RESULTS, "report.md", "report.html", "*.png")
"""What of each evaluated split is published: results, reports, plots (not predictions)."""


class PushError(UserError):
    """A push that cannot be made or that the Hub refused."""


@dataclass
class Pushed:
    """What a push sent (or, dry, would send)."""

    files: list[tuple[str, int]]
    """(path in the repository, size in bytes)."""
    folder: Path | None
    """The assembled folder, kept by a dry run."""
    url: str | None
    """The commit's address on the Hub."""


@dataclass
class PushRequest:
    """The command's arguments."""

    run: Path
    repo_id: str
    private: bool = False
    revision: str | None = None
    merged: bool = False
    commit_message: str | None = None
    dry_run: bool = False
    output: Path | None = None
    """Where a dry run writes the folder (default: RUN-hub beside the run)."""


def push(request: PushRequest) -> Pushed:
    """Assemble the repository folder of a finished run and upload it (unless dry)."""
    if not REPO_ID.match(request.repo_id):
        raise PushError(f"--repo-id {request.repo_id}: expected OWNER/NAME")
    if not request.run.is_dir():
        raise PushError(f"{request.run}: push takes a run folder")
    resolved = evaluation.resolve_target(request.run, [])
    token = None if request.dry_run else _token()
    _warn_if_unloadable(resolved.recipe.model)
    if request.dry_run:
        folder = request.output or request.run.parent / f"{request.run.name}-hub"
        check_can_create(folder, "--output")
        if holds_something(folder):
            # Nothing already there is overwritten or mixed into the repository's files.
            remedy = (
                "give --output a new or empty folder"
                if request.output
                else "remove it or pass --output DIR"
            )
            raise PushError(f"{folder} already exists and is not empty; {remedy}")
        folder.mkdir(parents=True, exist_ok=True)
        _assemble(resolved, request, folder, token)
        return Pushed(_listing(folder), folder, None)
    with tempfile.TemporaryDirectory(prefix="llama-tune-push-") as scratch:
        folder = Path(scratch) / "repository"
        folder.mkdir()
        _assemble(resolved, request, folder, token)
        url = _upload(request, folder, token)
        return Pushed(_listing(folder), None, url)


def _token() -> str:
    token = get_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    return token


def _warn_if_unloadable(model: schema.ModelConfig) -> None:
    name, _ = models.portable_base(model)
    if Path(name).expanduser().is_dir():
        print(
            f"warning: the base model is the local folder {name}; others cannot load the "
            "adapter until the base is published (train from a Hub id to avoid this)",
            file=sys.stderr,
        )


def _assemble(
    resolved: evaluation.Target, request: PushRequest, folder: Path, token: str | None
) -> None:
    """Weights, tokenizer, recipe, evaluation files and the model card into `folder`."""
    assert resolved.weights_dir is not None
    if request.merged:
        export.export(request.run, folder / "model")
        for item in (folder / "model").iterdir():
            item.rename(folder / item.name)
        (folder / "model").rmdir()
    else:
        for item in resolved.weights_dir.iterdir():
            if item.is_file() and item.name != "README.md":
                shutil.copy2(item, folder / item.name)
    shutil.copy2(request.run / RECIPE_COPY, folder / RECIPE_COPY)
    results = []
    # Only the evaluations of the weights published: best/'s are in SPLIT-best folders.
    best = resolved.weights_dir.name == BEST
    for split_dir in sorted((request.run / EVALUATION).glob("*/")):
        if not (split_dir / RESULTS).is_file() or evaluates_best(split_dir) != best:
            continue
        if split_dir.name != LM_EVAL:
            results.append(read_json(split_dir / RESULTS))
        target = folder / EVALUATION / split_dir.name
        target.mkdir(parents=True)
        for pattern in EVALUATION_FILES:
            for item in split_dir.glob(pattern):
                shutil.copy2(item, target / item.name)
    publication = model_card.Publication(
        repo_id=request.repo_id,
        recipe=resolved.recipe,
        summary=read_json(request.run / SUMMARY) if (request.run / SUMMARY).is_file() else {},
        results=results,
        merged=request.merged or resolved.recipe.adapter is None,
        license=_base_license(resolved.recipe.model, token),
        harness_table=harness.table(request.run / EVALUATION / LM_EVAL),
    )
    model_card.build(publication).save(folder / "README.md")


def _base_license(model: schema.ModelConfig, token: str | None) -> str | None:
    """The base model's license: a built-in's own, a Hub model's card's, else unknown."""
    builtin = models.builtin_model(model.name)
    if builtin is not None:
        return builtin.license
    name, revision = models.portable_base(model)
    if Path(name).expanduser().is_dir() or token is None:
        return None
    try:
        card_data = HfApi(token=token).model_info(name, revision=revision).card_data
    except (HfHubHTTPError, httpx2.HTTPError, OSError):
        return None
    return None if card_data is None else card_data.get("license")


def _listing(folder: Path) -> list[tuple[str, int]]:
    return [
        (str(path.relative_to(folder)), path.stat().st_size)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    ]


def _upload(request: PushRequest, folder: Path, token: str) -> str:
    api = HfApi(token=token)
    message = request.commit_message or f"Upload {request.run.name} with llama-tune"
    try:
        api.create_repo(request.repo_id, private=request.private, exist_ok=True)
        if request.revision is not None:
            api.create_branch(request.repo_id, branch=request.revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=request.repo_id,
            folder_path=folder,
            revision=request.revision,
            commit_message=message,
        )
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        raise PushError(_failure(request, f"HTTP {status}", error, token)) from None
    except (httpx2.HTTPError, OSError) as error:
        raise PushError(_failure(request, "cannot reach the Hub", error, token)) from None
    return str(commit.commit_url)


def _failure(request: PushRequest, what: str, error: Exception, token: str) -> str:
    """One line saying why the Hub refused, with the token (should a server echo it) masked."""
    detail = first_line(error).replace(token, "***")
    hint = {
        "HTTP 401": " (the token is invalid or expired)",
        "HTTP 403": " (the token may not write to this repository or namespace)",
    }.get(what, "")
    return f"push to {request.repo_id} failed: {what}{hint}: {detail}"


def describe(pushed: Pushed) -> str:
    """The files with their sizes, as the CLI prints them."""
    total = sum(size for _, size in pushed.files)
    lines = [f"  {size:>12,d}  {path}" for path, size in pushed.files]
    return "\n".join([*lines, f"  {total:>12,d}  in {len(pushed.files)} files"])
