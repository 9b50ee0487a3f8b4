"""tcmalloc for the `llama-tune` command, where the system has it.

PyTorch's CPU tensors come from malloc. glibc's hands large freed blocks back to the kernel, so
the next step faults the same pages in again: a slow bf16 SST-2 step (1.1 s) took 78k minor page
faults, a fast one (0.57 s) none. tcmalloc keeps the pages: 1.11x the tokens/s of LoRA on SST-2
(docs/BENCHMARKS.md). No wheel ships it, so the command looks for the system's
(`apt install libtcmalloc-minimal4`) and, finding it, starts itself again once with the library
in `LD_PRELOAD`, before anything heavy loads; the process keeps its ID, arguments and streams,
so torchrun and accelerate see no difference. `LLAMA_TUNE_ALLOCATOR` chooses: `auto` (the
default), `system` (glibc's malloc), or the path of a malloc library to preload instead.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from llama_tune.errors import UserError

SETTING = "LLAMA_TUNE_ALLOCATOR"
LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
"""Searched in this order; gperftools' full tcmalloc has the same allocator as the minimal one."""
_MALLOC_LIBRARY = re.compile(r"lib(tc|je|mi)malloc[^/:\s]*\.so")
_LARGE_ALLOCATION_REPORT = "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"


def search_folders() -> list[Path]:
    """Where shared libraries live: this environment's (virtualenv or conda), then the system's."""
    environments = [sys.prefix, os.environ.get("CONDA_PREFIX", "")]
    folders = [Path(prefix) / "lib" for prefix in environments if prefix]
    system = [
        "/usr/local/lib",
        f"/usr/lib/{platform.machine()}-linux-gnu",
        "/usr/lib",
        "/usr/lib64",
    ]
    return [*folders, *map(Path, system)]


def chosen_library(environ: Mapping[str, str], folders: list[Path]) -> Path | None:
    """The library `LLAMA_TUNE_ALLOCATOR` asks for, or the first tcmalloc in `folders` under
    `auto`; None for glibc's malloc."""
    setting = environ.get(SETTING, "auto").strip() or "auto"
    if setting == "system":
        return None
    if setting != "auto":
        library = Path(setting)
        if not library.is_file():
            raise UserError(
                f"{SETTING}={setting}: no such file; set it to auto, system or the path of a "
                "malloc library such as /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
            )
        return library
    found = (folder / name for name in LIBRARIES for folder in folders)
    return next((library for library in found if library.is_file()), None)


def preloading_environment(
    environ: Mapping[str, str], library: Path | None
) -> dict[str, str] | None:
    """The environment to start again in, with `library` preloaded; None where nothing is to
    change: no library, or a malloc library in `LD_PRELOAD` already (this restart's, or the
    user's own choice)."""
    preloaded = environ.get("LD_PRELOAD", "")
    if library is None or _MALLOC_LIBRARY.search(preloaded):
        return None
    environment = dict(environ)
    environment["LD_PRELOAD"] = f"{library}:{preloaded}" if preloaded else str(library)
    # tcmalloc prints a line for every allocation above 1 GiB: each shard of a large model.
    environment.setdefault(_LARGE_ALLOCATION_REPORT, str(2**50))
    return environment


def restart_with_allocator() -> None:
    """Replace this process with the same command under the chosen allocator (Linux only); a
    no-op where there is none or it is loaded already."""
    if sys.platform != "linux":
        return
    environment = preloading_environment(os.environ, chosen_library(os.environ, search_folders()))
    if environment is not None:
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)


def malloc_name(text: str) -> str:
    """The first malloc library named in `text` (a path, a memory map), as "tcmalloc_minimal";
    "glibc" for none."""
    found = _MALLOC_LIBRARY.search(text)
    return found.group(0).removeprefix("lib").removesuffix(".so") if found else "glibc"


def loaded_allocator() -> str:
    """The malloc library this process has mapped, for the summary and benchmark reports."""
    maps = Path("/proc/self/maps")
    return malloc_name(maps.read_text() if maps.exists() else "")
