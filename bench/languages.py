"""Grounded answers in English, Spanish and Chinese: which generator stays with the passage,
declines when the passage has no answer, and answers in the customer's language.

    python -m bench.languages --model smollm2=data/models/smollm2-135m-instruct \\
        --model smollm2-support=data/models/smollm2-135m-support --model gemma=PATH

Each ``--model`` is a Hugging Face folder with a chat template. Every model answers the
same 30 written questions (``bench/data/languages.json``) greedily under the service's
grounded prompt, one after another on one thread; the answers are scored by the service's
faithfulness check (English only: its figures for Chinese mean little), the language
detector, a decline lexicon and the question's key facts, and each model's tokens/s and
load time are printed in the same table. ``--out`` keeps every answer for reading.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

SET = Path(__file__).with_name("data") / "languages.json"
DECLINES = (
    "don't know", "do not know", "not sure", "connect you", "colleague", "a person", "human",
    "agent", "cannot answer", "can't answer", "no information", "not mentioned",
    "no lo sé", "no sé", "compañer", "una persona", "agente", "no tengo información",
    "no puedo responder", "no estoy segur", "no se menciona",
    "不知道", "同事", "转给", "转接", "人工", "不确定", "无法回答", "没有相关", "没有提到",
    "未提及",
)
"""Phrases that decline or hand off, in the three languages."""


def _system(passage: dict[str, str], pid: str) -> str:
    from core.config import PromptSettings
    from core.grounding import GROUNDING_INSTRUCTION

    return "\n\n".join([PromptSettings().system.strip(), GROUNDING_INSTRUCTION,
                        f"[{pid}] {passage['title']}\n{passage['body']}"])


def answer_all(folder: Path, data: dict[str, Any], plain: bool) -> tuple[float, list[dict]]:
    """Load the model (timed), then answer every question greedily, 80 new tokens at most,
    with the service's repetition settings unless ``plain``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.generation.base import GenerationParams
    from core.prompt import build_chat

    torch.set_num_threads(1)
    started = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    load_s = time.perf_counter() - started
    defaults = GenerationParams()
    options: dict[str, Any] = {"max_new_tokens": 80, "do_sample": False}
    if not plain:
        options.update(repetition_penalty=defaults.repetition_penalty,
                       no_repeat_ngram_size=defaults.no_repeat_ngram_size)
    rows = []
    for q in data["questions"]:
        chat = build_chat(_system(data["passages"][q["passage"]], q["passage"]), [],
                          q["question"], count_tokens=lambda s: len(tok(s).input_ids),
                          token_budget=1536)
        inputs = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in chat],
                                         add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)
        n_in = inputs["input_ids"].shape[1]
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, **options, pad_token_id=tok.pad_token_id
                                 if tok.pad_token_id is not None else tok.eos_token_id)
        rows.append({**q, "answer": tok.decode(out[0, n_in:], skip_special_tokens=True).strip(),
                     "new_tokens": int(out.shape[1] - n_in), "seconds": time.perf_counter() - t})
    return load_s, rows


def score(rows: list[dict], data: dict[str, Any]) -> None:
    from core.faithfulness import FaithfulnessChecker
    from core.language import LanguageDetector
    from core.retrieval import MiniLMEncoder

    checker, detector = FaithfulnessChecker(MiniLMEncoder().encode), LanguageDetector()
    for r in rows:
        p = data["passages"][r["passage"]]
        verdict = checker.check(r["answer"], [f"# {p['title']}\n\n{p['body']}"], [r["question"]])
        r.update(claims=verdict.n_claims, supported=verdict.n_supported,
                 dropped=verdict.n_dropped,
                 language=detector.detect(r["answer"]).language if r["answer"] else "",
                 declined=any(d in r["answer"].lower() for d in DECLINES),
                 key=any(k.lower() in r["answer"].lower() for k in r["keys"]))


def table(results: dict[str, tuple[float, list[dict]]]) -> str:
    lines = ["| model | lang | key fact (answerable) | claims supported / total | declines "
             "(no answer) | false declines | in the customer's language | tok/s | load s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (load_s, rows) in results.items():
        tps = sum(r["new_tokens"] for r in rows) / max(sum(r["seconds"] for r in rows), 1e-9)
        for lang in ("en", "es", "zh"):
            rs = [r for r in rows if r["lang"] == lang]
            yes, no = [r for r in rs if r["answerable"]], [r for r in rs if not r["answerable"]]
            lines.append(
                f"| {name} | {lang} | {sum(r['key'] for r in yes)}/{len(yes)} | "
                f"{sum(r['supported'] for r in rs)}/{sum(r['claims'] for r in rs)} | "
                f"{sum(r['declined'] for r in no)}/{len(no)} | "
                f"{sum(r['declined'] for r in yes)}/{len(yes)} | "
                f"{sum(r['language'] == lang for r in rs)}/{len(rs)} | "
                f"{tps:.1f} | {load_s:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=FOLDER")
    parser.add_argument("--plain", action="store_true",
                        help="plain greedy, without the service's repetition settings")
    parser.add_argument("--out", type=Path, help="JSON of every answer")
    args = parser.parse_args(argv)
    data = json.loads(SET.read_text(encoding="utf-8"))
    results = {}
    for spec in args.model:
        name, _, folder = spec.partition("=")
        if not Path(folder).is_dir():
            print(f"error: --model {spec}: {folder!r} is not a folder", file=sys.stderr)
            return 2
        results[name] = answer_all(Path(folder), data, args.plain)
        score(results[name][1], data)
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps({k: v[1] for k, v in results.items()},
                                       ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
