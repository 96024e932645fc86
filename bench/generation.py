"""Generation bench: a vLLM server against in-process transformers, same model, one run.

At each concurrency level (1, 8, 32 by default) it starts that many replies at once and
measures the aggregate throughput (generated tokens / wall time of the level), each
reply's own rate and its time to first token (TTFT), then prints the ratio of aggregate
throughputs. The in-process backend runs as the service runs it (``max_concurrent`` slots,
default 1: later requests queue), so its TTFT at concurrency 32 includes the queue, which
is what a customer would wait.

Tokens are the server's ``usage.completion_tokens`` for vLLM and the reply re-tokenized
with the model's tokenizer for transformers. Prompts are a fixed set of support questions,
the same for both backends; sampling is greedy.

    .venv/bin/python bench/generation.py --vllm-url http://127.0.0.1:8000
    .venv/bin/python bench/generation.py --levels 1,8 --max-tokens 32   # a short run

The vLLM server must serve the same model (``--served-model-name smollm2`` on the folder
``data/models/smollm2-135m-instruct``). When nothing answers at ``--vllm-url`` the bench
says so and measures the in-process backend alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from core.config import parse_settings  # noqa: E402
from core.generation.base import ChatMessage, GenerationParams  # noqa: E402
from core.generation.embedded import TransformersGenerator  # noqa: E402
from core.generation.model_files import ensure_hf_model  # noqa: E402
from core.generation.vllm import VLLMGenerator, VLLMStartupError  # noqa: E402

SYSTEM = "You are the customer support assistant of an online store. Answer helpfully."
QUESTIONS = (
    "How can I track my order?",
    "My parcel arrived damaged. What should I do?",
    "Can I change the delivery address after ordering?",
    "How do I return a pair of jeans that does not fit?",
    "When will I get my refund?",
    "I forgot my password and cannot log in.",
    "Do you ship to Canada, and how long does it take?",
    "My promo code does not work at checkout.",
)


@dataclass(frozen=True, slots=True)
class One:
    ttft_s: float
    total_s: float
    tokens: int


@dataclass(frozen=True, slots=True)
class Level:
    backend: str
    concurrency: int
    requests: int
    tokens: int
    wall_s: float
    aggregate_tok_s: float
    per_request_tok_s: float
    ttft_p50_s: float
    ttft_p95_s: float


def _chat(i: int) -> list[ChatMessage]:
    return [ChatMessage("system", SYSTEM), ChatMessage("user", QUESTIONS[i % len(QUESTIONS)])]


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _timed(pieces: AsyncIterator[str], count: Callable[[str], int]) -> One:
    started = time.perf_counter()
    first = 0.0
    text = ""
    async for piece in pieces:
        if not first:
            first = time.perf_counter() - started
        text += piece
    return One(first, time.perf_counter() - started, count(text))


async def _level(name: str, concurrency: int,
                 run_one: Callable[[int], Awaitable[One]]) -> Level:
    started = time.perf_counter()
    results: list[One] = await asyncio.gather(*(run_one(i) for i in range(concurrency)))
    wall = time.perf_counter() - started
    tokens = sum(r.tokens for r in results)
    return Level(
        name, concurrency, len(results), tokens, wall, tokens / wall,
        statistics.mean(r.tokens / max(r.total_s - r.ttft_s, 1e-9) for r in results),
        _p([r.ttft_s for r in results], 0.5), _p([r.ttft_s for r in results], 0.95),
    )


async def bench_vllm(url: str, model: str, levels: list[int],
                     params: GenerationParams) -> list[Level] | str:
    settings = parse_settings({"generator": {
        "backend": "vllm", "base_url": url, "model": model, "timeout_s": 3600.0,
        "first_token_timeout_s": 3600.0, "connect_timeout_s": 3.0,
    }}, "bench").generator
    gen = VLLMGenerator(settings)
    try:
        await gen.start()
    except VLLMStartupError as exc:
        return str(exc)

    async def one(i: int) -> One:
        stream = gen.stream(_chat(i), params)
        result = await _timed(stream, lambda text: 0)
        usage = stream.usage
        return One(result.ttft_s, result.total_s, usage.completion_tokens if usage else 0)

    try:
        await one(0)  # warm-up
        return [await _level("vllm", c, one) for c in levels]
    finally:
        await gen.close()


async def bench_transformers(model_dir: Path, levels: list[int], params: GenerationParams,
                             slots: int) -> list[Level]:
    gen = TransformersGenerator(model_dir, max_concurrent=slots)
    await gen.start()

    async def one(i: int) -> One:
        return await _timed(gen.stream(_chat(i), params), gen.count_tokens)

    try:
        await one(0)  # warm-up
        return [await _level("transformers", c, one) for c in levels]
    finally:
        await gen.close()


def _print(levels: list[Level]) -> None:
    print(f"{'backend':<13}{'conc':>5}{'tokens':>8}{'wall s':>9}{'agg tok/s':>11}"
          f"{'req tok/s':>11}{'TTFT p50':>10}{'TTFT p95':>10}")
    for lv in levels:
        print(f"{lv.backend:<13}{lv.concurrency:>5}{lv.tokens:>8}{lv.wall_s:>9.1f}"
              f"{lv.aggregate_tok_s:>11.1f}{lv.per_request_tok_s:>11.1f}"
              f"{lv.ttft_p50_s:>10.2f}{lv.ttft_p95_s:>10.2f}")


async def main_async(args: argparse.Namespace) -> list[Level]:
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    params = GenerationParams(max_new_tokens=args.max_tokens, temperature=0.0,
                              repetition_penalty=1.15, no_repeat_ngram_size=0)
    results: list[Level] = []
    vllm = await bench_vllm(args.vllm_url, args.model, levels, params)
    if isinstance(vllm, str):
        print(f"vLLM NOT MEASURED: {vllm}\nMeasuring the in-process transformers backend "
              "only; start vLLM and pass --vllm-url for the comparison.\n", flush=True)
    else:
        results += vllm
    model_dir = await asyncio.to_thread(ensure_hf_model, args.model_dir, Path(args.data_dir))
    results += await bench_transformers(model_dir, levels, params, args.slots)
    print(f"max_tokens={args.max_tokens}, greedy, model folder {model_dir}")
    _print(results)
    by = {(lv.backend, lv.concurrency): lv for lv in results}
    for c in levels:
        if ("vllm", c) in by and ("transformers", c) in by:
            ratio = by["vllm", c].aggregate_tok_s / by["transformers", c].aggregate_tok_s
            print(f"concurrency {c}: vLLM / transformers aggregate throughput = {ratio:.2f}x")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="smollm2", help="the name vLLM serves")
    parser.add_argument("--model-dir", default="smollm2",
                        help="the same model for transformers: 'smollm2' or an HF folder")
    parser.add_argument("--data-dir", default=str(REPO / "data"))
    parser.add_argument("--levels", default="1,8,32", help="concurrency levels")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=1,
                        help="transformers max_concurrent (the service's default is 1)")
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = asyncio.run(main_async(args))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(lv) for lv in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
