"""Shared fixtures: the real datasets, a tiny random Llama with the real SmolLM2 tokenizer."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

# No test reaches the network: a Hub id the tests name must fail at once, not after the retries
# an unreachable Hub costs (45 s for one missing model). Set before huggingface_hub reads it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `make test` runs one pytest worker per core (pytest-xdist): each computes on one thread, and so
# do the processes it starts, or two workers of two threads would thrash two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama_tune import allocator, checkpoint, models

LONG_FIRST = ("test_zero.py", "test_sharding.py", "test_benchmarks.py")
"""Modules of launched and benchmark tests, a minute or two each: run first, so that the two
workers share them and the short tests fill in after, instead of one worker running the last
long ones while the other waits (the modules sort last by name)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in LONG_FIRST)


REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "llama_tune"]
SHARED_DATA = Path(os.environ.get("LLAMA_TUNE_DATA", REPO.parent / "shared" / "datasets"))
TEST_DATA = REPO / "tests" / "data"
"""Tiny datasets written for the tests (tests/data/README.md): unit tests need nothing else."""
INSTRUCTION_FOLDERS = [
    ("instruction/alpaca_en_demo", "alpaca"),
    ("instruction/alpaca_en_demo_messages", "messages"),
    ("instruction/sharegpt_dummy", "sharegpt"),
    ("classification/sst2", "text"),
]
"""Shared folders read as instruction rows, and the format each one is written in."""


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared real datasets (SST-2, TREC, AESLC, Multi30k)."""
    if not (SHARED_DATA / "classification" / "sst2" / "train.jsonl").is_file():
        pytest.fail(f"shared datasets not found at {SHARED_DATA}; set LLAMA_TUNE_DATA")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _data_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_TUNE_DATA", str(SHARED_DATA))


@pytest.fixture(scope="session")
def builtin_dir() -> Path:
    """The built-in SmolLM2 converted to safetensors (converted once, then cached)."""
    return models.builtin_folder("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(builtin_dir: Path):
    return models.load_tokenizer(str(builtin_dir))


def torchrun(
    arguments: list[str],
    processes: int = 2,
    timeout: float = 600,
    launch: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`llama-tune ARGUMENTS` on `processes` CPU processes joined by gloo, through torchrun, the
    real launcher (`accelerate launch --cpu --num_processes N` starts only one process); one
    thread each, so that they do not thrash two cores. `launch` adds environment variables
    (those `accelerate launch` sets from a config, say)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", str(processes), "-m", "llama_tune", *arguments]
    environment = os.environ | {"OMP_NUM_THREADS": "1"} | (launch or {})
    output = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    with subprocess.Popen(command, cwd=REPO, env=environment, **output) as launched:
        try:
            stdout, stderr = launched.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # torchrun starts each process in a session of its own, which killing torchrun
            # would leave spinning through the rest of the suite: stopped, it stops them.
            launched.terminate()
            launched.communicate(timeout=60)
            raise
    return subprocess.CompletedProcess(command, launched.returncode, stdout, stderr)


def expected_malloc() -> str:
    """What `summary.json` names as the malloc of a run through the command: tcmalloc where this
    machine has it (the command restarts itself under it, allocator.py), else glibc's."""
    tcmalloc = allocator.chosen_library({}, allocator.search_folders())
    return allocator.malloc_name(str(tcmalloc or ""))


def write_tiny_llama(
    folder: Path, tokenizer, width: int = 64, layers: int = 2, seed: int = 0
) -> Path:
    """Save a small random Llama with the real SmolLM2 tokenizer into `folder`."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=width // 16,
        num_key_value_heads=width // 32,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A 2-layer, 64-wide random Llama with the real SmolLM2 tokenizer, saved as a folder."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture
def make_tiny_llama(tmp_path: Path, tokenizer):
    """Factory: another small random Llama (width, layers) with the same tokenizer."""
    return lambda name, **shape: write_tiny_llama(tmp_path / name, tokenizer, **shape)


@pytest.fixture
def crash_during_save(monkeypatch: pytest.MonkeyPatch):
    """Factory: a block in which checkpoint files whose path contains `marker` fail to write.

    The block must raise the injected error (the run stops mid-save); afterwards saving works.
    """

    @contextlib.contextmanager
    def crash(marker: str, file_name: str | None = None) -> Iterator[None]:
        real_save = checkpoint.torch.save

        def failing_save(obj: object, path: Path, *args: object, **kwargs: object) -> None:
            if marker in str(path) and file_name in (None, Path(path).name):
                raise OSError("disk full (injected)")
            real_save(obj, path, *args, **kwargs)

        monkeypatch.setattr(checkpoint.torch, "save", failing_save)
        try:
            with pytest.raises(OSError, match="injected"):
                yield
        finally:
            monkeypatch.setattr(checkpoint.torch, "save", real_save)

    return crash


def write_tiny_recipe(
    folder: Path,
    model: Path,
    run: str = "run",
    logging: dict | None = None,
    validation: dict | None = None,
    checkpoint: dict | None = None,
    **train: object,
) -> Path:
    """Write a fast sentiment recipe (tests/data) on `model` into `folder`; returns its path.

    `run` names the run folder inside `folder`; `train` keys override the loop defaults, and
    `logging`, `validation` and `checkpoint` are those sections.
    """
    recipe = {
        "model": {"name": str(model)},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {
            "source": str(TEST_DATA / "sentiment"),
            "task": "classification",
            "max_length": 96,
        },
        "train": {"max_steps": 8, "batch_size": 8, "lr": 1e-3, **train},
        "logging": {"every": 1, **(logging or {})},
        "validation": validation or {},
        "checkpoint": checkpoint or {},
        "output": {"dir": str(folder / run)},
    }
    path = folder / f"{run}.yaml"
    # JSON is valid YAML.
    path.write_text(json.dumps(recipe, indent=2))
    return path


@pytest.fixture
def tiny_recipe(tiny_model_dir: Path, tmp_path: Path):
    """Factory: `write_tiny_recipe` on the tiny model, in the test's tmp_path."""
    return lambda run="run", **sections: write_tiny_recipe(
        tmp_path, tiny_model_dir, run, **sections
    )


@pytest.fixture(scope="session")
def session_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder every pytest-xdist worker of this session shares (the session's own base
    folder without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def ddp_reference(session_folder: Path, tiny_model_dir: Path):
    """Factory: the run `launched.COMPARED[name]` trained on two DDP processes, once per session
    whichever test or worker asks first: what FSDP and ZeRO runs are compared with. (Every
    worker's tiny model holds the same seeded weights.)"""
    from filelock import FileLock

    from launched import COMPARED, COMPARED_OVERRIDES, launched
    from llama_tune import run_folder

    def reference(name: str) -> Path:
        folder = session_folder / "ddp-references"
        folder.mkdir(exist_ok=True)
        run_dir = folder / name
        with FileLock(folder / f"{name}.lock"):
            summary = run_dir / run_folder.SUMMARY
            if not (summary.is_file() and json.loads(summary.read_text())["status"] == "finished"):
                recipe = write_tiny_recipe(folder, tiny_model_dir, name, **COMPARED[name])
                launched(recipe, *COMPARED_OVERRIDES[name], "--overwrite")
        return run_dir

    return reference


@pytest.fixture
def same_weights():
    """Check that two weights folders (an adapter, or a fully tuned model) hold the same tensors:
    every safetensors file of the first, to 1e-6, with the same names in the second."""
    from safetensors.torch import load_file

    def check(expected_dir: Path, actual_dir: Path) -> None:
        files = sorted(expected_dir.glob("*.safetensors"))
        assert files, f"no weights in {expected_dir}"
        for weights in files:
            expected, actual = load_file(weights), load_file(actual_dir / weights.name)
            assert expected.keys() == actual.keys()
            for name in expected:
                torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6)

    return check


@pytest.fixture
def resumes_exactly(tiny_recipe, crash_during_save, same_weights):
    """Factory: check that a run stopped by a crash mid-save, then resumed, ends with the same
    weights as an uninterrupted run; returns the uninterrupted run's result."""
    from llama_tune import config, train

    def check(name: str, overrides: list[str], max_steps: int = 8, crash_step: int = 6):
        reference = tiny_recipe(f"{name}-reference", max_steps=max_steps, checkpoint={"every": 4})
        expected = train.run(config.load(reference, overrides), reference)
        crashing = tiny_recipe(f"{name}-crashing", max_steps=max_steps, checkpoint={"every": 2})
        with crash_during_save(f"step-{crash_step:08d}"):
            train.run(config.load(crashing, overrides), crashing)
        resumed = train.run(config.load(crashing, overrides), crashing, resume=True)
        same_weights(expected.weights_dir, resumed.weights_dir)
        return expected

    return check


def reset_accelerate_state() -> None:
    """Each in-process run builds its own Accelerator; Accelerate keeps process-wide state."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> None:
    reset_accelerate_state()


@pytest.fixture
def cli_here(capsys: pytest.CaptureFixture[str]):
    """Run `llama-tune ARGS` in this process, check its exit code and return what it printed to
    stderr: seconds faster than `cli`, whose new process imports torch again. For commands
    that stop on a user mistake; `cli` checks that the real command prints no traceback."""
    from llama_tune.cli import main

    def run(*args: str, expect: int = 0) -> str:
        reset_accelerate_state()
        frozen = gc.get_freeze_count()
        try:
            code = main(list(args))
        except SystemExit as stopped:  # argparse's usage errors
            code = stopped.code
        err = capsys.readouterr().err
        assert code == expect, err[-3000:]
        # Only the command freezes what its imports made: here this process's garbage would stay
        # (frozen objects freed since leave the count).
        assert gc.get_freeze_count() <= frozen
        return err

    return run


@pytest.fixture
def cli():
    """Run the real `llama-tune` command (or `command`), with `env` added to the environment,
    and check its exit code."""

    def run(
        *args: str, expect: int = 0, command: list[str] = CLI, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [*command, *args],
            capture_output=True,
            text=True,
            check=False,
            cwd=REPO,
            timeout=600,
            env=os.environ | env if env else None,
        )
        assert done.returncode == expect, done.stderr[-3000:]
        return done

    return run


def pytest_collection_finish() -> None:
    """Freeze what collecting imported (torch, transformers, every test module): full
    collections no longer walk its half a million objects (their time in three test files went
    from 6.1 s to 2.9 s of 78 s)."""
    gc.freeze()
