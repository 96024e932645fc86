"""The contract of a platform connection, which the service starts with the pipeline.

It sits above :mod:`core.pipeline` (an adapter is handed the running pipeline), while
the channels it implements (:mod:`core.channels`) sit below it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from core.pipeline import Pipeline


class Adapter(ABC):
    """A platform connection: started with the pipeline, stopped on shutdown.

    An adapter is the platform's :class:`CustomerChannel` and, where the platform has an
    operator room, also registers an :class:`OperatorChannel` with ``pipeline.operators``.
    """

    __slots__ = ()
    platform: str

    @abstractmethod
    async def start(self, pipeline: Pipeline) -> None:
        """Connect, attach channels (``pipeline.attach(self)``) and begin receiving."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop receiving; in-flight sends may finish."""
