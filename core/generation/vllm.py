"""The vLLM generator: chat completions from an OpenAI-compatible server, streamed.

Speaks ``POST /v1/chat/completions`` with ``stream: true`` and reads server-sent events
(``data: {chat.completion.chunk}`` lines, a final usage chunk asked for with
``stream_options.include_usage``, then ``data: [DONE]``). Any server that speaks this API
works; vLLM is the one it is tested against. The configured model name may be a LoRA
adapter name that the server lists in ``/v1/models``.

Failures are handled in layers. Before the first token, connection errors, 429 and 5xx
are retried with exponential backoff and jitter (a 429's ``Retry-After`` is honoured);
after the first token nothing is retried, because the customer has already seen part of
the reply: the reply fails with ``GenerationError(partial=True)``. Repeated failures
open a :class:`~core.generation.circuit.CircuitBreaker`, which fails requests at once
and probes ``GET /health`` until the server is back. Closing the stream closes the HTTP
connection, which is how vLLM learns to abort the request and free its batch slot.

Three timeouts: ``connect_timeout_s`` for the TCP connect, ``first_token_timeout_s`` from
sending a request to its first text (per attempt; a server that accepted the request but
stays silent is overloaded, so that is not retried), and ``timeout_s`` for the whole reply,
retries included.

``count_tokens`` budgets the prompt history. With ``tokenizer_dir`` (a local folder with
the served model's ``tokenizer.json``) it counts exactly; otherwise it estimates: one
token per word, punctuation mark and line break, plus one per eight UTF-8 bytes. On the
project's English support texts that over-counts SmolLM2's BPE tokens by about half (the
median), so a history cut by the estimate fits the model's context; text full of code or
rare scripts can still be under-counted, hence the tokenizer option.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from core.config import ConfigError, GeneratorSettings
from core.generation.base import ChatMessage, GenerationError, GenerationParams
from core.generation.circuit import BreakerState, CircuitBreaker, CircuitOpen

log = logging.getLogger(__name__)

_ESTIMATE_PIECES = re.compile(r"\w+|[^\w\s]|\n")
_ESTIMATE_BYTES_PER_EXTRA_TOKEN = 8


class GenerationTimeout(GenerationError):
    """The server took too long (to the first piece, or in all): counted as a timeout."""

    kind = "timeout"


class CircuitOpenError(GenerationError):
    """The breaker refused the request before any connection: counted as circuit open."""

    kind = "circuit_open"


class VLLMStartupError(ConfigError):
    """The server is missing or does not serve the configured model (names URL and models)."""


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole (non-streamed) reply."""

    text: str
    finish_reason: str | None
    usage: Usage | None


class _Retryable(Exception):
    """A failure before the first token that another attempt may not have."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _ServerReachable(GenerationError):
    """The server answered, but refused the request (a 4xx): says nothing about its health."""


class ChatStream:
    """The text pieces of one reply; ``usage`` and ``finish_reason`` are set when it ends.

    ``aclose()`` (or cancelling the task reading it) closes the HTTP response.
    """

    __slots__ = ("_pieces", "finish_reason", "usage")

    def __init__(self) -> None:
        self._pieces: AsyncIterator[str] | None = None
        self.usage: Usage | None = None
        self.finish_reason: str | None = None

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> str:
        assert self._pieces is not None
        return await self._pieces.__anext__()

    async def aclose(self) -> None:
        if self._pieces is not None:
            await self._pieces.aclose()  # type: ignore[attr-defined]


def _api_root(base_url: str) -> str:
    """``http://host:8000``, also when configured as the OpenAI-style ``.../v1``."""
    root = base_url.rstrip("/")
    return root[:-3] if root.endswith("/v1") else root


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_message(body: str) -> str:
    """The message of an OpenAI/vLLM error body (nested ``error`` or flat), else the text."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:300] or "(empty body)"
    if isinstance(data, dict):
        inner = data.get("error", data)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:300]
        if isinstance(inner, str):
            return inner[:300]
    return body.strip()[:300]


def _usage(data: Any) -> Usage | None:
    if not isinstance(data, dict):
        return None
    return Usage(int(data.get("prompt_tokens") or 0), int(data.get("completion_tokens") or 0))


class VLLMGenerator:
    """Streams replies from a vLLM (or other OpenAI-compatible) server."""

    __slots__ = (
        "_api_key", "_backoff_base_s", "_backoff_max_s", "_breaker", "_model_verified",
        "_probe_timeout", "_root", "_session", "_settings", "_tokenizer", "_tokenizer_dir",
    )

    def __init__(
        self,
        settings: GeneratorSettings,
        *,
        api_key: str | None = None,
        tokenizer_dir: Path | None = None,
        failure_threshold: int = 5,
        probe_interval_s: float = 2.0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 8.0,
    ) -> None:
        self._settings = settings
        self._api_key = api_key
        self._root = _api_root(settings.base_url)
        self._tokenizer_dir = tokenizer_dir
        self._tokenizer: Any = None
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._session: aiohttp.ClientSession | None = None
        self._model_verified = False
        self._probe_timeout = aiohttp.ClientTimeout(total=settings.connect_timeout_s + 5.0)
        self._breaker = CircuitBreaker(
            f"model server {self._root}", self._probe,
            failure_threshold=failure_threshold, probe_interval_s=probe_interval_s,
        )

    @property
    def name(self) -> str:
        return self._settings.model

    @property
    def base_url(self) -> str:
        return self._root

    @property
    def saturated(self) -> bool:
        """Never: the server batches requests continuously, so a new one does not wait
        for a slot here (its queue is the server's to report)."""
        return False

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    # -- life cycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Check that the server is up and serves the model, or start degraded."""
        if self._tokenizer_dir is not None:
            self._tokenizer = await asyncio.to_thread(self._load_tokenizer, self._tokenizer_dir)
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self._settings.connect_timeout_s,
            sock_connect=self._settings.connect_timeout_s,
        )
        self._session = aiohttp.ClientSession(timeout=timeout, headers=headers)
        try:
            await self._check_server()
        except VLLMStartupError as exc:
            if not self._settings.start_degraded:
                await self._session.close()
                self._session = None
                raise
            log.warning("%s; starting degraded (generator.start_degraded = true): replies "
                        "fall back until the server is ready", exc)
            self._breaker.trip(str(exc))
            return
        log.info("generating with %r served at %s", self._settings.model, self._root)

    async def close(self) -> None:
        await self._breaker.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    @staticmethod
    def _load_tokenizer(folder: Path) -> Any:
        from tokenizers import Tokenizer

        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"generator tokenizer: {path} does not exist")
        return Tokenizer.from_file(str(path))

    def count_tokens(self, text: str) -> int:
        if self._tokenizer is not None:
            return len(self._tokenizer.encode(text, add_special_tokens=False).ids)
        pieces = len(_ESTIMATE_PIECES.findall(text))
        return pieces + len(text.encode("utf-8")) // _ESTIMATE_BYTES_PER_EXTRA_TOKEN

    async def _check_server(self) -> None:
        session = self._require_session()
        url = f"{self._root}/health"
        try:
            async with session.get(url, timeout=self._probe_timeout) as resp:
                if resp.status != 200:
                    raise VLLMStartupError(
                        f"generator.base_url: {url} answered {resp.status}, not 200: "
                        f"{_error_message(await resp.text())}"
                    )
            served = await self._served_models()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise VLLMStartupError(
                f"generator.base_url: no OpenAI-compatible server answers at {self._root} "
                f"({type(exc).__name__}: {exc or 'timed out'}); start the model server or set "
                "generator.start_degraded = true"
            ) from None
        if self._settings.model not in served:
            listed = ", ".join(repr(m) for m in served) or "none"
            raise VLLMStartupError(
                f"generator.model: the server at {self._root} does not serve "
                f"{self._settings.model!r}; it serves: {listed}"
            )
        self._model_verified = True

    async def _served_models(self) -> list[str]:
        url = f"{self._root}/v1/models"
        async with self._require_session().get(url, timeout=self._probe_timeout) as resp:
            body = await resp.text()
            if resp.status == 401:
                raise VLLMStartupError(
                    f"{url} refused the API key (401); set ${self._settings.api_key_env} "
                    "to the key the server was started with"
                )
            if resp.status != 200:
                raise VLLMStartupError(
                    f"{url} answered {resp.status}: {_error_message(body)}"
                )
        try:
            return [str(m["id"]) for m in json.loads(body)["data"]]
        except (ValueError, KeyError, TypeError):
            raise VLLMStartupError(f"{url} did not return a model list: {body[:200]!r}") from None

    async def _probe(self) -> bool:
        """The breaker's health check; after a degraded start it also wants the model."""
        session = self._require_session()
        async with session.get(f"{self._root}/health", timeout=self._probe_timeout) as resp:
            if resp.status != 200:
                return False
        if not self._model_verified:
            try:
                await self._check_server()
            except VLLMStartupError as exc:
                log.info("still waiting for the model server: %s", exc)
                return False
        return True

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise GenerationError("the vLLM generator is not started")
        return self._session

    # -- requests --------------------------------------------------------------------

    def _body(self, messages: Sequence[ChatMessage], params: GenerationParams,
              stream: bool) -> dict[str, Any]:
        """The request; ``repetition_penalty`` and ``seed`` are vLLM's extra sampling fields.

        ``no_repeat_ngram_size`` has no vLLM equivalent and is not sent.
        """
        body: dict[str, Any] = {
            "model": self._settings.model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "repetition_penalty": params.repetition_penalty,
            "stream": stream,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def _begin(self, messages: Sequence[ChatMessage], params: GenerationParams,
               stream: bool) -> tuple[dict[str, Any], float]:
        """The request body and its deadline, once the breaker lets a request through.

        Both paths start here, so an open circuit fails them alike, before any connection.
        """
        self._require_session()
        try:
            self._breaker.acquire()
        except CircuitOpen as exc:
            raise CircuitOpenError(str(exc)) from None
        deadline = asyncio.get_running_loop().time() + self._settings.timeout_s
        return self._body(messages, params, stream), deadline

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self._backoff_max_s * 4)
        delay = min(self._backoff_max_s, self._backoff_base_s * 2**attempt)
        return delay / 2 + random.uniform(0, delay / 2)

    async def _post(self, body: dict[str, Any]) -> aiohttp.ClientResponse:
        """Send; a 200 is returned open, a retryable status raises :class:`_Retryable`."""
        resp = await self._require_session().post(
            f"{self._root}/v1/chat/completions", json=body,
            headers={"Accept": "text/event-stream" if body["stream"] else "application/json"},
        )
        if resp.status == 200:
            return resp
        try:
            message = _error_message(await resp.text())
        finally:
            resp.close()
        problem = f"{self._root} answered {resp.status}: {message}"
        if resp.status == 429 or resp.status >= 500:
            raise _Retryable(problem, _retry_after(resp.headers.get("Retry-After")))
        raise _ServerReachable(problem)

    async def _with_retries(self, attempt_once: Any, deadline: float) -> Any:
        """Run ``attempt_once()`` until it succeeds, retrying what is retryable in time."""
        loop = asyncio.get_running_loop()
        retries = self._settings.retries
        for attempt in range(retries + 1):
            try:
                return await attempt_once()
            except _Retryable as exc:
                problem, retry_after = str(exc), exc.retry_after
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                problem, retry_after = f"{self._root}: {type(exc).__name__}: {exc}", None
            if attempt == retries:
                raise GenerationError(f"{problem} (gave up after {retries + 1} attempts)")
            pause = self._backoff(attempt, retry_after)
            if loop.time() + pause >= deadline:
                raise GenerationError(f"{problem} (no time left to retry)")
            log.info("generation attempt %d failed (%s); retrying in %.2f s",
                     attempt + 1, problem, pause)
            await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    def stream(self, messages: Sequence[ChatMessage], params: GenerationParams) -> ChatStream:
        out = ChatStream()
        out._pieces = self._stream(messages, params, out)
        return out

    async def _stream(
        self, messages: Sequence[ChatMessage], params: GenerationParams, out: ChatStream
    ) -> AsyncIterator[str]:
        body, deadline = self._begin(messages, params, stream=True)
        outcome = "released"
        resp: aiohttp.ClientResponse | None = None
        events: AsyncIterator[Any] | None = None
        produced = False
        try:
            resp, events, first, done = await self._open_stream(body, deadline, out)
            if first:
                produced = True
                yield first
            while not done:
                try:
                    async with asyncio.timeout_at(deadline):
                        event = await anext(events, None)
                except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                    raise GenerationError(
                        f"{self._root} dropped the reply: {type(exc).__name__}: {exc}",
                        partial=produced,
                    ) from None
                except TimeoutError:
                    raise GenerationTimeout(
                        f"the reply took longer than {self._settings.timeout_s:g} s",
                        partial=produced,
                    ) from None
                except GenerationError as exc:
                    raise type(exc)(str(exc), partial=produced) from None
                if event is None:
                    raise GenerationError(
                        f"{self._root} closed the stream before [DONE]", partial=produced
                    )
                if event == "[DONE]":
                    break
                piece = self._piece(event, out, partial=produced)
                if piece:
                    produced = True
                    yield piece
            outcome = "success"
            if out.usage is not None:
                log.debug("usage: %d prompt + %d completion tokens",
                          out.usage.prompt_tokens, out.usage.completion_tokens)
        except _ServerReachable:
            outcome = "success"
            raise
        except GenerationError as exc:
            outcome = "failure"
            self._breaker.failure(str(exc))
            raise
        except Exception as exc:
            outcome = "failure"
            self._breaker.failure(repr(exc))
            raise GenerationError(
                f"generation from {self._root} failed: {type(exc).__name__}: {exc}",
                partial=produced,
            ) from exc
        finally:
            if resp is not None:
                resp.close()  # drops the connection: vLLM aborts an unfinished request
            if events is not None:
                await events.aclose()  # type: ignore[attr-defined]
            if outcome == "success" or (outcome == "released" and produced):
                self._breaker.success()
            elif outcome == "released":
                self._breaker.release()

    async def _open_stream(
        self, body: dict[str, Any], deadline: float, out: ChatStream
    ) -> tuple[aiohttp.ClientResponse, AsyncIterator[Any], str, bool]:
        """Send and read up to the first text; everything up to there may be retried.

        Returns the open response, its remaining events, the first text and whether the
        stream already ended (an empty reply)."""
        loop = asyncio.get_running_loop()
        first_token_s = self._settings.first_token_timeout_s

        async def attempt() -> tuple[aiohttp.ClientResponse, AsyncIterator[Any], str, bool]:
            resp: aiohttp.ClientResponse | None = None
            try:
                async with asyncio.timeout_at(min(deadline, loop.time() + first_token_s)):
                    resp = await self._post(body)
                    events = self._events(resp)
                    while True:
                        event = await anext(events, None)
                        if event is None:
                            raise _Retryable(f"{self._root} closed the stream before any text")
                        if event == "[DONE]":
                            return resp, events, "", True
                        piece = self._piece(event, out, partial=False, retryable=True)
                        if piece:
                            return resp, events, piece, False
            except TimeoutError as exc:
                if isinstance(exc, aiohttp.ClientError):
                    raise
                if resp is not None:
                    resp.close()
                waited = min(first_token_s, self._settings.timeout_s)
                raise GenerationTimeout(f"{self._root} sent no text within {waited:g} s") from None
            except BaseException:
                if resp is not None:
                    resp.close()
                raise

        return await self._with_retries(attempt, deadline)  # type: ignore[no-any-return]

    async def _events(self, resp: aiohttp.ClientResponse) -> AsyncIterator[Any]:
        """Server-sent events: each event's joined ``data:`` lines, JSON-decoded or ``[DONE]``."""
        data: list[str] = []
        while True:
            raw = await resp.content.readline()
            if not raw:
                return
            line = raw.decode("utf-8").rstrip("\r\n")
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
                continue
            if line or not data:
                continue  # comments, other fields, blank keep-alives
            payload, data = "\n".join(data), []
            if payload == "[DONE]":
                yield payload
                continue
            try:
                yield json.loads(payload)
            except ValueError:
                raise GenerationError(
                    f"{self._root} sent a malformed event: {payload[:200]!r}"
                ) from None

    def _piece(self, event: Any, out: ChatStream, *, partial: bool,
               retryable: bool = False) -> str:
        """The text in one ``chat.completion.chunk``; records usage and finish reason."""
        if not isinstance(event, dict):
            raise GenerationError(f"{self._root} sent an unexpected event: {event!r}",
                                  partial=partial)
        if "error" in event or event.get("object") == "error":
            message = _error_message(json.dumps(event))
            if retryable:
                raise _Retryable(f"{self._root} reported an error: {message}")
            raise GenerationError(f"{self._root} failed mid-reply: {message}", partial=partial)
        if event.get("usage"):
            out.usage = _usage(event["usage"])
        text = ""
        for choice in event.get("choices") or ():
            delta = choice.get("delta") or {}
            text += delta.get("content") or ""
            reason = choice.get("finish_reason")
            if reason:
                out.finish_reason = reason
                if reason == "abort":
                    problem = f"{self._root} aborted the request"
                    if retryable and not text:
                        raise _Retryable(problem)
                    raise GenerationError(problem, partial=partial or bool(text))
        return text

    async def complete(self, messages: Sequence[ChatMessage],
                       params: GenerationParams) -> Completion:
        """One whole reply without streaming; retried as a whole (nothing was shown yet).

        Only the whole-reply timeout applies: there is no first token to wait for."""
        body, deadline = self._begin(messages, params, stream=False)

        async def attempt() -> dict[str, Any]:
            async with asyncio.timeout_at(deadline):
                resp = await self._post(body)
                try:
                    return await resp.json(content_type=None)  # type: ignore[no-any-return]
                finally:
                    resp.close()

        try:
            data = await self._with_retries(attempt, deadline)
            choice = data["choices"][0]
            completion = Completion(
                str(choice["message"].get("content") or ""), choice.get("finish_reason"),
                _usage(data.get("usage")),
            )
        except _ServerReachable:
            self._breaker.success()
            raise
        except TimeoutError:
            error = f"{self._root} sent no reply within {self._settings.timeout_s:g} s"
            self._breaker.failure(error)
            raise GenerationTimeout(error) from None
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            self._breaker.failure(str(exc))
            raise GenerationError(f"{self._root} sent a malformed completion: {exc}") from None
        except GenerationError as exc:
            self._breaker.failure(str(exc))
            raise
        except BaseException:
            self._breaker.release()
            raise
        self._breaker.success()
        return completion

    @property
    def healthy(self) -> bool:
        return self._breaker.state is BreakerState.CLOSED
