"""Answer bench: time to the first shown text and to the whole reply, at 4 conversations at
once, with the real embedded model and every check the service runs.

The written in-scope questions of ``knowledge/eval_questions.toml`` (the knowledge base
answers each) go through the real service (``bots.service.Service``: SQLite, MiniLM
sentiment, acts, retrieval, the configured generator, the faithfulness check), on a fresh
database per variant, ``--concurrency`` customers at a time, each asking one question. In
the same run:

- ``auto`` (the product): generated and checked within ``[answers] first_text_s`` /
  ``reply_s``, else the help centre's own sentences;
- ``generate`` (baseline): generated and checked, however long the model takes;
- ``unchecked``: generated and shown as it streams, no check (what the service did before);
- ``extract``: the help centre's own sentences only, the model never called (the floor:
  what everything but generation costs).

It prints first text and whole reply p50/p99 for each, the share answered extractively,
and each variant's ratio to the baseline; every exchange is written to
``data/replay/bench-answers-<variant>.jsonl``.

    nice -n 10 .venv/bin/python -m bench.answers --questions 24
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
import time
import tomllib
from pathlib import Path

from finetune.eval_replay import Dialog, outcome, percentile, replay, replay_settings

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {
    "auto": {"check": True, "mode": "auto"},
    "generate": {"check": True, "mode": "generate"},
    "unchecked": {"check": False, "mode": "generate"},
    "extract": {"check": True, "mode": "extract"},
}


def questions(limit: int) -> list[str]:
    data = tomllib.loads((REPO / "knowledge" / "eval_questions.toml").read_text())
    return [entry["q"] for entry in data["in_scope"]][:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "config.toml"))
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--variants", nargs="+", default=["auto", "generate", "unchecked"],
                        choices=list(VARIANTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asked = questions(args.questions)
    dialogs = [Dialog(f"q{n}", (q,)) for n, q in enumerate(asked)]
    figures: dict[str, dict[str, float]] = {}
    for name in args.variants:
        v = VARIANTS[name]
        with tempfile.TemporaryDirectory(prefix="bench-answers-") as tmp:
            settings = replay_settings(args.config, Path(tmp) / "bench.db",
                                       check=bool(v["check"]), mode=str(v["mode"]))
            started = time.perf_counter()
            rows = asyncio.run(replay(settings, dialogs, args.concurrency, 600.0))
            took = time.perf_counter() - started
        out = REPO / "data" / "replay" / f"bench-answers-{name}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps({**r, "outcome": outcome(r)}) + "\n" for r in rows))
        first = [r["first_text_s"] for r in rows if r["first_text_s"] is not None]
        whole = [r["reply_s"] for r in rows if r["reply_s"] is not None]
        kinds = [outcome(r) for r in rows]
        figures[name] = {
            "first50": percentile(first, 50), "first99": percentile(first, 99),
            "whole50": percentile(whole, 50), "whole99": percentile(whole, 99),
            "extractive": kinds.count("answered (extractive)") / len(rows),
            "generated": kinds.count("answered (generated)") / len(rows),
            "dropped": sum((r.get("answer") or {}).get("dropped", 0) for r in rows),
            "unsupported_shown": sum(len(r.get("unsupported_shown", ())) for r in rows),
            "took": took,
        }
        print(f"{name}: {len(rows)} questions in {took:.0f} s", flush=True)
    base = figures.get("generate")
    print(f"\n{len(dialogs)} in-scope questions, {args.concurrency} conversations at once\n")
    print("| variant | first text p50 s | p99 s | whole reply p50 s | p99 s | generated | "
          "extractive | dropped sentences | unsupported shown | whole p50 vs generate |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, f in figures.items():
        ratio = f"{f['whole50'] / base['whole50']:.2f}x" if base and base["whole50"] else "-"
        print(f"| {name} | {f['first50']:.2f} | {f['first99']:.2f} | {f['whole50']:.2f} | "
              f"{f['whole99']:.2f} | {f['generated']:.0%} | {f['extractive']:.0%} | "
              f"{f['dropped']:.0f} | {f['unsupported_shown']:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
