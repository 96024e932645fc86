"""Micro-batching: concurrent single requests become one batched call in a worker thread.

Encoders are far cheaper per item in a batch; a conversation burst or many
conversations at once should cost one forward pass, not many.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")
R = TypeVar("R")


class MicroBatcher(Generic[In, Out]):
    """Collects items for up to ``max_wait_s`` or ``max_batch`` items, then runs ``fn``."""

    __slots__ = ("_executor", "_fn", "_max_batch", "_max_wait_s", "_pending", "_worker")

    def __init__(
        self,
        fn: Callable[[Sequence[In]], Sequence[Out]],
        *,
        max_batch: int = 32,
        max_wait_s: float = 0.005,
        name: str = "batch",
        initializer: Callable[[], None] | None = None,
    ) -> None:
        """``initializer`` runs once in the worker thread (per-thread settings such as
        torch's intra-op thread count)."""
        self._fn = fn
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._pending: asyncio.Queue[tuple[In, asyncio.Future[Out]]] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(
            1, thread_name_prefix=name, initializer=initializer
        )
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, item: In) -> Out:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run(), name="micro-batcher")
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        await self._pending.put((item, future))
        return await future

    async def run_in_worker(self, fn: Callable[[], R]) -> R:
        """Run ``fn`` on the batch thread (starting it, so its initializer has run)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._pending.get()]
            deadline = loop.time() + self._max_wait_s
            while len(batch) < self._max_batch:
                if not self._pending.empty():
                    batch.append(self._pending.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._pending.get(), remaining))
                except TimeoutError:
                    break
            items = [item for item, _ in batch]
            try:
                results = await loop.run_in_executor(self._executor, self._fn, items)
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
