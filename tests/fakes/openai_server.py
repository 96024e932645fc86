"""An OpenAI-compatible model server in aiohttp, for tests on machines without vLLM.

It generates with the real SmolLM2 (through the project's in-process
:class:`~core.generation.embedded.TransformersGenerator`) and answers with the wire shapes
of vLLM 0.32, captured from a real ``vllm.entrypoints.openai.api_server``: ``/health``
(200, empty body), ``/v1/models`` (model cards, LoRA adapters with ``parent`` set to the
base), ``/v1/chat/completions`` streamed (a role chunk, one chunk per piece, a chunk
with ``finish_reason``, a usage chunk with empty ``choices`` when
``stream_options.include_usage``, ``data: [DONE]``) and whole, vLLM's error JSON
(``{"error": {"message", "type", "param", "code"}}``), and the ``/metrics`` series the
tests read (``vllm:num_requests_running``, ``vllm:request_success_total`` by
``finished_reason``, ``vllm:generation_tokens_total``).

A client that disconnects aborts its request, as in vLLM: the handler is cancelled and the
generation thread stopped. Run it like vLLM, with vLLM's flags (those it does not need are
accepted and ignored)::

    python -m tests.fakes.openai_server --model DIR --served-model-name smollm2 \\
        --enable-lora --lora-modules tuned=ADAPTER_DIR --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from core.generation.base import ChatMessage, GenerationParams
from core.generation.embedded import TransformersGenerator, _streamer_class

log = logging.getLogger("openai_server")

_FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")


class _AdapterGenerator(TransformersGenerator):
    """A peft LoRA adapter merged into a fresh copy of the base model."""

    __slots__ = ("_base_dir",)

    def __init__(self, base_dir: Path, adapter_dir: Path, *, max_concurrent: int) -> None:
        super().__init__(adapter_dir, max_concurrent=max_concurrent)
        self._base_dir = base_dir

    def _load(self) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self._base_dir)
        base = AutoModelForCausalLM.from_pretrained(self._base_dir, dtype=torch.float32)
        self._model = PeftModel.from_pretrained(base, self._model_dir).merge_and_unload().eval()
        self._streamer = _streamer_class()


@dataclass(frozen=True, slots=True)
class _Served:
    name: str
    root: str
    parent: str | None
    generator: TransformersGenerator


class _ApiError(Exception):
    def __init__(self, status: int, message: str, err_type: str, param: str | None) -> None:
        super().__init__(message)
        self.status, self.err_type, self.param = status, err_type, param

    def response(self) -> web.Response:
        return web.json_response(_error_body(str(self), self.err_type, self.status, self.param),
                                 status=self.status)


def _error_body(message: str, err_type: str, code: int, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


class OpenAICompatServer:
    """The server; :meth:`app` is the aiohttp application."""

    __slots__ = (
        "_api_key", "_base", "_created", "_finished", "_generated_tokens", "_max_model_len",
        "_models", "_prompt_tokens", "_running", "_tokenizer",
    )

    def __init__(
        self,
        model_dir: Path,
        served_name: str,
        lora_modules: dict[str, Path],
        *,
        max_model_len: int = 2048,
        api_key: str | None = None,
        max_concurrent: int = 4,
    ) -> None:
        self._base = served_name
        self._max_model_len = max_model_len
        self._api_key = api_key
        self._created = int(time.time())
        self._models: dict[str, _Served] = {
            served_name: _Served(served_name, str(model_dir), None,
                                 TransformersGenerator(model_dir, max_concurrent=max_concurrent))
        }
        for name, path in lora_modules.items():
            self._models[name] = _Served(
                name, str(path), served_name,
                _AdapterGenerator(model_dir, path, max_concurrent=max_concurrent),
            )
        self._tokenizer: Any = None
        self._running = 0
        self._finished: Counter[str] = Counter()
        self._prompt_tokens = 0
        self._generated_tokens = 0

    async def start(self) -> None:
        from transformers import AutoTokenizer

        await asyncio.gather(*(m.generator.start() for m in self._models.values()))
        base_root = Path(self._models[self._base].root)
        self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, base_root)
        # Like vLLM's start-up profiling run: the first generation in a process is slow.
        warm_up = [ChatMessage("user", "Hi")]
        for served in self._models.values():
            async for _ in served.generator.stream(warm_up, GenerationParams(max_new_tokens=2)):
                pass

    async def close(self) -> None:
        for served in self._models.values():
            await served.generator.close()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    # -- endpoints -------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    def _authorised(self, request: web.Request) -> bool:
        return self._api_key is None or (
            request.headers.get("Authorization") == f"Bearer {self._api_key}"
        )

    async def _list_models(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return web.json_response({"error": "Unauthorized"}, status=401)
        cards = [
            {
                "id": m.name, "object": "model", "created": self._created, "owned_by": "vllm",
                "root": m.root, "parent": m.parent,
                "max_model_len": self._max_model_len if m.parent is None else None,
                "permission": [{
                    "id": f"modelperm-{secrets.token_hex(8)}", "object": "model_permission",
                    "created": self._created, "allow_create_engine": False,
                    "allow_sampling": True, "allow_logprobs": True,
                    "allow_search_indices": False, "allow_view": True,
                    "allow_fine_tuning": False, "organization": "*", "group": None,
                    "is_blocking": False,
                }],
            }
            for m in self._models.values()
        ]
        return web.json_response({"object": "list", "data": cards})

    async def _metrics(self, request: web.Request) -> web.Response:
        label = f'engine="0",model_name="{self._base}"'
        lines = [
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{label}}} {float(self._running)}",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{label}}} {float(self._prompt_tokens)}",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{label}}} {float(self._generated_tokens)}",
            "# TYPE vllm:request_success_total counter",
        ]
        lines += [
            f'vllm:request_success_total{{engine="0",finished_reason="{reason}",'
            f'model_name="{self._base}"}} {float(self._finished[reason])}'
            for reason in _FINISH_REASONS
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if not self._authorised(request):
            return web.json_response({"error": "Unauthorized"}, status=401)
        try:
            body = await request.json()
            served, messages, params, prompt_tokens = self._validate(body)
        except _ApiError as exc:
            return exc.response()
        except ValueError as exc:
            return _ApiError(400, f"JSON decode error: {exc}", "Bad Request", None).response()
        request_id = f"chatcmpl-{secrets.token_hex(8)}"
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return await self._stream(request, request_id, served, messages, params,
                                      prompt_tokens, include_usage)
        return await self._whole(request_id, served, messages, params, prompt_tokens)

    def _validate(
        self, body: Any
    ) -> tuple[_Served, list[ChatMessage], GenerationParams, int]:
        if not isinstance(body, dict):
            raise _ApiError(400, "Input should be a valid dictionary", "Bad Request", "body")
        name = body.get("model") or self._base
        served = self._models.get(name)
        if served is None:
            aliases = ", ".join(self._models)
            raise _ApiError(404, f"The model `{name}` does not exist. Valid aliases: {aliases}.",
                            "NotFoundError", "model")
        raw = body.get("messages")
        if not isinstance(raw, list) or not raw:
            raise _ApiError(
                400, "1 validation error:\n  {'type': 'missing', 'loc': 'body.messages', "
                "'msg': 'Field required'}", "Bad Request", "body.messages",
            )
        messages = [ChatMessage(m["role"], str(m.get("content") or "")) for m in raw]
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        if max_tokens is not None and max_tokens > self._max_model_len:
            raise _ApiError(
                400, f"max_tokens={max_tokens} cannot be greater than max_model_len="
                f"{self._max_model_len}. Please request fewer output tokens. "
                f"(parameter=max_tokens, value={max_tokens})", "BadRequestError", "max_tokens",
            )
        prompt_ids = self._tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True, tokenize=True, return_dict=True,
        )["input_ids"]
        prompt_tokens = len(prompt_ids)
        if max_tokens is None:
            max_tokens = self._max_model_len - prompt_tokens
        if prompt_tokens + max_tokens > self._max_model_len:
            raise _ApiError(
                400, f"This model's maximum context length is {self._max_model_len} tokens. "
                f"However, your request has {prompt_tokens + max_tokens} tokens.",
                "BadRequestError", "input_tokens",
            )
        params = GenerationParams(
            max_new_tokens=int(max_tokens),
            temperature=float(body.get("temperature", 1.0)),
            top_p=float(body.get("top_p", 1.0)),
            repetition_penalty=float(body.get("repetition_penalty", 1.0)),
            no_repeat_ngram_size=0,
            seed=body.get("seed"),
        )
        return served, messages, params, prompt_tokens

    def _count(self, text: str) -> int:
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def _finish(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        if reason != "abort":  # vLLM 0.32 does not count requests its clients dropped
            self._finished[reason] += 1
        self._prompt_tokens += prompt_tokens
        self._generated_tokens += completion_tokens

    async def _whole(self, request_id: str, served: _Served, messages: list[ChatMessage],
                     params: GenerationParams, prompt_tokens: int) -> web.Response:
        self._running += 1
        text, reason = "", "abort"
        try:
            async for piece in served.generator.stream(messages, params):
                text += piece
            completion_tokens = self._count(text)
            reason = "length" if completion_tokens >= params.max_new_tokens else "stop"
        finally:
            self._running -= 1
            self._finish(reason, prompt_tokens, self._count(text))
        return web.json_response({
            "id": request_id, "object": "chat.completion", "created": int(time.time()),
            "model": served.name,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None,
                            "annotations": None, "audio": None, "function_call": None,
                            "reasoning": None},
                "logprobs": None, "finish_reason": reason, "stop_reason": None,
                "token_ids": None, "routed_experts": None,
            }],
            "service_tier": None, "system_fingerprint": "vllm-0.32.0-fake",
            "usage": {"prompt_tokens": prompt_tokens,
                      "total_tokens": prompt_tokens + completion_tokens,
                      "completion_tokens": completion_tokens,
                      "prompt_tokens_details": None, "completion_tokens_details": None},
            "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None,
            "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
        })

    async def _stream(
        self, request: web.Request, request_id: str, served: _Served,
        messages: list[ChatMessage], params: GenerationParams, prompt_tokens: int,
        include_usage: bool,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8"}
        )
        await response.prepare(request)
        created = int(time.time())

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            data = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                    "model": served.name, "choices": choices, **extra}
            return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()

        def choice(content: str, finish: str | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {"index": 0, "delta": {"content": content}, "logprobs": None,
                                   "finish_reason": finish, "token_ids": None}
            if finish is not None:
                out["stop_reason"] = None
            return out

        self._running += 1
        text, reason = "", "abort"
        pieces = served.generator.stream(messages, params)
        try:
            await response.write(chunk(
                [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}], prompt_token_ids=None, prompt_text=None,
            ))
            async for piece in pieces:
                text += piece
                await response.write(chunk([choice(piece)]))
            completion_tokens = self._count(text)
            reason = "length" if completion_tokens >= params.max_new_tokens else "stop"
            await response.write(chunk([choice("", reason)]))
            if include_usage:
                await response.write(chunk([], usage={
                    "prompt_tokens": prompt_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                    "completion_tokens": completion_tokens,
                }, system_fingerprint="vllm-0.32.0-fake"))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            log.info("client of %s went away; request aborted", request_id)
            raise
        except Exception as exc:
            log.exception("generation for %s failed", request_id)
            reason = "error"
            error = _error_body(f"Internal server error: {exc}", "InternalServerError", 500, None)
            await response.write(f"data: {json.dumps(error)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        finally:
            await pieces.aclose()  # type: ignore[attr-defined]
            self._running -= 1
            self._finish(reason, prompt_tokens, self._count(text))
        return response


def _lora_modules(values: list[str]) -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            raise SystemExit(f"--lora-modules wants name=path, got {value!r}")
        modules[name] = Path(path)
    return modules


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--served-model-name", default="")
    parser.add_argument("--lora-modules", nargs="*", default=[])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--max-concurrent", type=int, default=4)
    args, ignored = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if ignored:
        log.info("ignoring vLLM flags this server does not need: %s", " ".join(ignored))
    server = OpenAICompatServer(
        args.model, args.served_model_name or str(args.model), _lora_modules(args.lora_modules),
        max_model_len=args.max_model_len, api_key=args.api_key,
        max_concurrent=args.max_concurrent,
    )

    async def on_startup(app: web.Application) -> None:
        await server.start()
        log.info("Application startup complete.")

    async def on_cleanup(app: web.Application) -> None:
        await server.close()

    app = server.app()
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    web.run_app(app, host=args.host, port=args.port, handler_cancellation=True,
                access_log=None, print=None, shutdown_timeout=2.0)


if __name__ == "__main__":
    main()
