"""Whether every process of a launch got through a set-up phase, agreed through the launch's
key-value store rather than through a collective.

A process that fails inside a phase may leave the others waiting in one of the phase's
collectives (the run folder's broadcast, the teacher cache's barrier, ZeRO-3's broadcasts while
loading). Were the agreement a collective too, theirs would be matched against it: a hang under
gloo, undefined under NCCL. The store takes part in no collective: each process counts itself
there at the phase's end, and a failed one waits a short while for the others. Those that do
not come are waiting for it in a collective; it exits, and the launcher stops them.
"""

from __future__ import annotations

import itertools
from datetime import timedelta

from torch.distributed import DistStoreError, distributed_c10d

FAILED_PROCESS_WAITS = timedelta(minutes=2)
"""How long a process that failed a phase waits for the others to finish it: long enough for
processes still loading a model, short beside a launch left hanging."""

_phases = itertools.count()


def count_failures(failed: bool, processes: int, wait: timedelta) -> int | None:
    """How many of the launch's `processes` failed the phase, once every one of them has
    reached its end; None when they have not within `wait`. Every process calls this once per
    phase, in the same order, so that they count under the same key."""
    # The default process group's store (torch-private; the launched set-up tests use it).
    store = distributed_c10d._get_default_store()
    phase = f"llama-tune/set-up/{next(_phases)}"
    store.add(f"{phase}/failed", int(failed))
    if store.add(f"{phase}/arrived", 1) == processes:
        store.set(f"{phase}/done", "1")
    try:
        store.wait([f"{phase}/done"], wait)
    except DistStoreError:
        return None
    return store.add(f"{phase}/failed", 0)
