"""Sentiment throughput: the service's micro-batched classifier against Hugging Face's
``pipeline("text-classification")`` called once per message, same model, same run.

    python -m bench.sentiment [--model data/models/sentiment-minilm] [--messages 512]

Prints messages/s and p50/p99 latency at concurrency 1, 16 and 64, and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TEXTS = [
    "@united my flight was cancelled and nobody at the desk will help me!!!",
    "Thanks so much, the crew was wonderful today",
    "How do I change the delivery address on my order?",
    "Still waiting for my refund after 3 weeks. Unacceptable.",
    "Can you tell me when my package will arrive?",
    "I LOVE the new app update, so much faster 😍",
    "Your website keeps logging me out, this is so frustrating",
    "What payment methods do you accept?",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def drive(call: Callable[[str], Awaitable[object]], n: int, concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(i: int) -> None:
        async with gate:
            start = time.perf_counter()
            await call(TEXTS[i % len(TEXTS)] + f" #{i}")
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - start
    return {"rate": n / elapsed, "p50": statistics.median(latencies) * 1000,
            "p99": percentile(latencies, 0.99) * 1000}


async def main(args: argparse.Namespace) -> int:
    from transformers import pipeline

    from core.sentiment import FineTunedClassifier

    if not (args.model / "config.json").is_file():
        print(f"error: no fine-tuned sentiment model at {args.model}; run "
              "`supportbot finetune sentiment` first or pass --model", file=sys.stderr)
        return 2
    ours = FineTunedClassifier(args.model, max_batch=64, max_wait_ms=5)
    await ours.start()
    hf = pipeline("text-classification", model=str(args.model), device=-1)
    single = ThreadPoolExecutor(1)
    loop = asyncio.get_running_loop()

    async def per_message(text: str) -> object:
        return await loop.run_in_executor(single, hf, text)

    await drive(ours.classify, 32, 8)  # warm-up
    await drive(per_message, 8, 1)
    print(f"model {args.model}, {args.messages} messages per level")
    print(f"{'concurrency':>11} | {'micro-batched msg/s':>19} {'p50 ms':>7} {'p99 ms':>7} | "
          f"{'per-message msg/s':>17} {'p50 ms':>7} {'p99 ms':>7} | {'ratio':>5}")
    for concurrency in args.concurrency:
        a = await drive(ours.classify, args.messages, concurrency)
        b = await drive(per_message, args.messages, concurrency)
        print(f"{concurrency:>11} | {a['rate']:>19.1f} {a['p50']:>7.1f} {a['p99']:>7.1f} | "
              f"{b['rate']:>17.1f} {b['p50']:>7.1f} {b['p99']:>7.1f} | "
              f"{a['rate'] / b['rate']:>5.2f}")
    await ours.close()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("data/models/sentiment-minilm"))
    parser.add_argument("--messages", type=int, default=512)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    sys.exit(asyncio.run(main(parser.parse_args())))
