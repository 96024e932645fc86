"""Per-thread torch intra-op thread counts for the model worker threads.

torch keeps the intra-op thread count per OS thread (OpenMP), and a thread's first torch
call copies the process default. On a small busy CPU, two intra-op threads make every op
wait at a barrier for a descheduled partner (2-15x slower than one thread on the loaded
2-core dev box), so each model worker pins its own count without changing anyone else's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_LOCK = threading.Lock()


def _in_fresh_thread(fn: Callable[[], T]) -> T:
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def pin_torch_threads(count: int) -> None:
    """Give the calling thread ``count`` intra-op threads; the process default, read and
    restored from fresh threads, stays what it was. One lock for every caller, since two
    workers starting at once would otherwise restore each other's counts."""
    import torch

    with _LOCK:
        default = _in_fresh_thread(torch.get_num_threads)
        torch.set_num_threads(count)
        torch.get_num_threads()
        _in_fresh_thread(lambda: torch.set_num_threads(default))
