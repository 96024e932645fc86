"""The embedded generator: a transformers causal LM in this process, off the event loop.

Inference runs in a small thread pool; tokens cross back to the loop through a
``TextIteratorStreamer`` whose queue is the loop's own. Requests wait on a FIFO
semaphore, so conversations take turns on the model in arrival order.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from core.generation.base import ChatMessage, GenerationError, GenerationParams
from core.generation.model_files import LOAD_LOCK

log = logging.getLogger(__name__)

_END = object()


def _streamer_class() -> type:
    from transformers import StoppingCriteria, TextIteratorStreamer

    class LoopStreamer(TextIteratorStreamer):
        """Hands each decoded piece to an asyncio queue instead of a blocking one."""

        def __init__(self, tokenizer: Any, loop: asyncio.AbstractEventLoop, queue: Any) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self._loop = loop
            self._aqueue = queue

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                self._loop.call_soon_threadsafe(self._aqueue.put_nowait, text)
            if stream_end:
                self._loop.call_soon_threadsafe(self._aqueue.put_nowait, _END)

    class CancelCriteria(StoppingCriteria):
        def __init__(self, event: threading.Event) -> None:
            self.event = event

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
            return self.event.is_set()

    LoopStreamer.CancelCriteria = CancelCriteria  # type: ignore[attr-defined]
    return LoopStreamer


class TransformersGenerator:
    """In-process generation with any Hugging Face causal-LM folder."""

    __slots__ = (
        "_device", "_executor", "_model", "_model_dir", "_slots", "_streamer", "_threads",
        "_tokenizer",
    )

    def __init__(
        self, model_dir: Path, *, device: str = "cpu", threads: int = 0, max_concurrent: int = 1
    ) -> None:
        self._model_dir = model_dir
        self._device = device
        self._threads = threads
        self._slots = asyncio.Semaphore(max_concurrent)
        self._executor = ThreadPoolExecutor(max_concurrent, thread_name_prefix="generate")
        self._model: Any = None
        self._tokenizer: Any = None
        self._streamer: Any = None

    @property
    def name(self) -> str:
        return self._model_dir.name

    @property
    def saturated(self) -> bool:
        """Every slot is generating: a new request would wait for one to free."""
        return self._slots.locked()

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load)

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self._threads:
            torch.set_num_threads(self._threads)
        with LOAD_LOCK:
            self._tokenizer = AutoTokenizer.from_pretrained(self._model_dir)
            model = AutoModelForCausalLM.from_pretrained(self._model_dir, dtype=torch.float32)
            self._model = model.to(self._device).eval()
        self._streamer = _streamer_class()
        log.info("generator loaded from %s", self._model_dir)

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    async def stream(
        self, messages: Sequence[ChatMessage], params: GenerationParams
    ) -> AsyncIterator[str]:
        if self._model is None:
            raise GenerationError("generator not started")
        async with self._slots:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[object] = asyncio.Queue()
            cancel = threading.Event()
            streamer = self._streamer(self._tokenizer, loop, queue)
            future = loop.run_in_executor(
                self._executor, self._generate, messages, params, streamer, cancel
            )
            produced = False
            try:
                while True:
                    getter = asyncio.ensure_future(queue.get())
                    await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        exc = future.exception()
                        if exc is not None:
                            raise GenerationError(f"generation failed: {exc}", partial=produced)
                        # Finished: drain whatever the streamer queued last.
                        while not queue.empty():
                            item = queue.get_nowait()
                            if item is not _END:
                                produced = True
                                yield str(item)
                        return
                    item = getter.result()
                    if item is _END:
                        await future
                        return
                    produced = True
                    yield str(item)
            finally:
                cancel.set()
                if not future.done():
                    await asyncio.shield(asyncio.wait_for(asyncio.shield(future), None))

    def _generate(
        self,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
        streamer: Any,
        cancel: threading.Event,
    ) -> None:
        import torch

        chat = [{"role": m.role, "content": m.content} for m in messages]
        inputs = self._tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(self._device)
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
            if params.temperature > 0
            else {"do_sample": False}
        )
        with torch.inference_mode():
            self._model.generate(
                **inputs,
                max_new_tokens=params.max_new_tokens,
                repetition_penalty=params.repetition_penalty,
                no_repeat_ngram_size=params.no_repeat_ngram_size,
                streamer=streamer,
                stopping_criteria=[streamer.CancelCriteria(cancel)],
                pad_token_id=self._tokenizer.pad_token_id or self._tokenizer.eos_token_id,
                **sampling,
            )
