import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama_tune import allocator
from llama_tune.errors import UserError


def _library(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"\x7fELF")
    return folder / name


def test_auto_takes_the_first_tcmalloc_in_search_order(tmp_path: Path) -> None:
    environment, system = tmp_path / "env" / "lib", tmp_path / "usr" / "lib"
    full = _library(environment, "libtcmalloc.so.4")
    minimal = _library(system, "libtcmalloc_minimal.so.4")
    folders = [environment, system]
    # The minimal build is the preferred name, wherever it lies; then folder order.
    assert allocator.chosen_library({}, folders) == minimal
    assert allocator.chosen_library({allocator.SETTING: "auto"}, folders) == minimal
    minimal.unlink()
    assert allocator.chosen_library({}, folders) == full
    full.unlink()
    assert allocator.chosen_library({}, folders) is None


def test_system_and_an_explicit_path(tmp_path: Path) -> None:
    _library(tmp_path, "libtcmalloc_minimal.so.4")  # what `auto` would take
    jemalloc = _library(tmp_path / "other", "libjemalloc.so.2")
    assert allocator.chosen_library({allocator.SETTING: "system"}, [tmp_path]) is None
    assert allocator.chosen_library({allocator.SETTING: str(jemalloc)}, [tmp_path]) == jemalloc
    with pytest.raises(UserError, match=r"LLAMA_TUNE_ALLOCATOR=/no/such\.so: no such file"):
        allocator.chosen_library({allocator.SETTING: "/no/such.so"}, [tmp_path])


def test_the_preloading_environment_keeps_the_users_choices() -> None:
    library = Path("/usr/lib/libtcmalloc_minimal.so.4")
    assert allocator.preloading_environment({"PATH": "/bin"}, None) is None
    environment = allocator.preloading_environment({"PATH": "/bin"}, library)
    assert environment is not None
    assert environment["LD_PRELOAD"] == str(library)
    assert environment["PATH"] == "/bin"
    assert int(environment["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 2**40
    # Another preloaded library stays, after ours.
    other = allocator.preloading_environment({"LD_PRELOAD": "/opt/libhook.so"}, library)
    assert other is not None
    assert other["LD_PRELOAD"] == f"{library}:/opt/libhook.so"
    # A malloc preloaded already (the restart's own, or the user's) ends the restarts.
    for preloaded in (str(library), "/opt/jemalloc/lib/libjemalloc.so.2", "libmimalloc.so"):
        assert allocator.preloading_environment({"LD_PRELOAD": preloaded}, library) is None
    threshold = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "1000"}
    assert (
        allocator.preloading_environment(threshold, library)[
            "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"
        ]
        == "1000"
    )


def test_malloc_names_from_paths_and_memory_maps() -> None:
    assert allocator.malloc_name("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4") == (
        "tcmalloc_minimal"
    )
    assert allocator.malloc_name("7f00-7f01 r-xp /opt/lib/libjemalloc.so.2\n") == "jemalloc"
    assert allocator.malloc_name("7f00-7f01 r-xp /usr/lib/libc.so.6\n") == "glibc"


def test_search_folders_cover_this_environment_and_the_system() -> None:
    folders = allocator.search_folders()
    assert folders[0] == Path(sys.prefix) / "lib"
    assert Path("/usr/lib") in folders
    assert Path("/usr/local/lib") in folders


def _installed() -> Path | None:
    return allocator.chosen_library({}, allocator.search_folders())


def _report_allocator(environment: dict[str, str] | None) -> subprocess.CompletedProcess:
    """A new Python process, started with `environment`, printing the malloc it runs on."""
    probe = "from llama_tune import allocator; print(allocator.loaded_allocator())"
    return subprocess.run(
        [sys.executable, "-c", probe], env=environment, capture_output=True, text=True, check=True
    )


@pytest.mark.skipif(_installed() is None, reason="no tcmalloc on this machine")
def test_a_preloaded_process_reports_tcmalloc() -> None:
    environment = allocator.preloading_environment(os.environ | {"LD_PRELOAD": ""}, _installed())
    done = _report_allocator(environment)
    assert done.stdout.strip().startswith("tcmalloc"), done.stderr


def test_a_plain_process_reports_glibc() -> None:
    assert _report_allocator(os.environ | {"LD_PRELOAD": ""}).stdout.strip() == "glibc"
