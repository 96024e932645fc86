"""Fine-tune bench: training throughput, and the base model against the tuned one, one run.

Runs the real ``supportbot finetune generator`` (LoRA on SmolLM2) for a fixed number of
optimizer steps on ``--data``, then scores the base model and the tuned ``merged/`` folder
on the same held-out examples (split by content hash, as the trainer does): the token loss
on the reference replies, and ROUGE-L of greedy replies against them. The base model is
the baseline; ratios are tuned / base.

    .venv/bin/python -m bench.finetune                          # the default budget
    .venv/bin/python -m bench.finetune --steps 10 --generate 8   # a short run

Throughput counts the non-padding tokens of every training micro-batch (prompt, context
and target) over the wall time of the optimizer steps only (no model load, eval or export).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_DATA = (REPO.parent / "shared" / "data" / "bitext-support"
                / "Bitext_Sample_Customer_Support_Training_Dataset.csv")


@dataclass(frozen=True, slots=True)
class Figures:
    steps: int
    batch_size: int
    max_seq_len: int
    train_seconds: float
    tokens: int
    steps_per_s: float
    tokens_per_s: float
    eval_examples: int
    base_eval_loss: float
    tuned_eval_loss: float
    generated: int
    base_rouge_l: float
    tuned_rouge_l: float
    base_s_per_reply: float
    tuned_s_per_reply: float
    wall_seconds: float


def _train(args: argparse.Namespace, out: Path) -> dict:
    from finetune import generator

    parser = argparse.ArgumentParser()
    generator.configure(parser)
    argv = [
        "--data", str(args.data), "--out", str(out), "--base", args.base,
        "--data-dir", str(args.data_dir), "--max-steps", str(args.steps),
        "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len),
        "--lr", str(args.lr), "--eval-split", str(args.eval_split),
        "--eval-examples", str(args.eval_examples), "--eval-every", str(args.steps),
        "--patience", "0", "--device", args.device, "--threads", str(args.threads),
        "--seed", str(args.seed), "--merged-dtype", "float32",
    ]
    code = generator.run(parser.parse_args(argv))
    if code:
        raise SystemExit(code)
    return json.loads((out / "metrics.json").read_text())


def run(args: argparse.Namespace) -> Figures:
    from finetune.causal_lm import default_system, resolve_device
    from finetune.conversations import read_file
    from finetune.eval_generator import evaluate_models

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        out = Path(tmp) / "run"
        metrics = _train(args, out)
        held, _ = read_file(out / "heldout.jsonl")
        report = evaluate_models(
            [args.base, str(out / "merged")], held[:args.generate], labels=["base", "tuned"],
            system=default_system(), device=resolve_device(args.device),
            data_dir=args.data_dir, batch_size=args.batch_size, max_seq_len=args.max_seq_len,
            max_new_tokens=args.max_new_tokens, progress=True,
        )
    base, tuned = report.models
    seconds = float(metrics["train_seconds"])
    return Figures(
        steps=int(metrics["steps"]), batch_size=args.batch_size, max_seq_len=args.max_seq_len,
        train_seconds=seconds, tokens=int(metrics["tokens_seen"]),
        steps_per_s=metrics["steps"] / seconds, tokens_per_s=metrics["tokens_seen"] / seconds,
        eval_examples=min(args.eval_examples, int(metrics["heldout_examples"])),
        base_eval_loss=float(metrics["base_eval_loss"]),
        tuned_eval_loss=float(metrics["final_eval_loss"]),
        generated=len(base.replies), base_rouge_l=base.rouge_l, tuned_rouge_l=tuned.rouge_l,
        base_s_per_reply=base.seconds_per_reply, tuned_s_per_reply=tuned.seconds_per_reply,
        wall_seconds=time.monotonic() - started,
    )


def report(f: Figures) -> str:
    def ratio(tuned: float, base: float) -> str:
        return f"{tuned / base:.2f}x" if base else "-"

    return "\n".join([
        f"training: {f.steps} steps of {f.batch_size} examples (<= {f.max_seq_len} tokens) "
        f"in {f.train_seconds:.1f} s: {f.steps_per_s:.3f} steps/s, "
        f"{f.tokens_per_s:.0f} tokens/s ({f.tokens} tokens)",
        "",
        "| model | eval loss | ROUGE-L | s/reply |",
        "|---|---:|---:|---:|",
        f"| base (baseline) | {f.base_eval_loss:.3f} | {f.base_rouge_l:.3f} | "
        f"{f.base_s_per_reply:.2f} |",
        f"| tuned, {f.steps} steps | {f.tuned_eval_loss:.3f} | {f.tuned_rouge_l:.3f} | "
        f"{f.tuned_s_per_reply:.2f} |",
        f"| tuned / base | {ratio(f.tuned_eval_loss, f.base_eval_loss)} | "
        f"{ratio(f.tuned_rouge_l, f.base_rouge_l)} | |",
        "",
        f"eval loss on {f.eval_examples} held-out examples, ROUGE-L on {f.generated} greedy "
        f"replies; whole run {f.wall_seconds:.0f} s",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="training data (default: the Bitext CSV in ../shared/data)")
    parser.add_argument("--base", default="smollm2", help="'smollm2' or an HF model folder")
    parser.add_argument("--data-dir", type=Path, default=REPO / "data",
                        help="where the embedded model is converted to")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (the budget)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--eval-split", type=float, default=0.1)
    parser.add_argument("--eval-examples", type=int, default=32,
                        help="held-out examples for the eval loss")
    parser.add_argument("--generate", type=int, default=16,
                        help="held-out examples generated for ROUGE-L")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        print(f"error: {args.data}: training data not found (the Bitext CSV is in "
              "../shared/data/bitext-support/; pass --data PATH)", file=sys.stderr)
        return 2
    if args.steps <= 0 or args.generate <= 0:
        print("error: --steps and --generate must be positive", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    figures = run(args)
    print(report(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(figures), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
