"""`supportbot eval retrieval`: how often the right help article is retrieved for a request.

Every request of the Bitext customer-support set is searched in the knowledge base; a hit is
a retrieved article listed for the request's intent in ``knowledge/intent_map.toml``.
Recall@1 and Recall@3 are printed for the encoder alone, BM25 alone and the hybrid, so the
table shows whether fusing the two is worth it.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
import tomllib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from core.knowledge import KnowledgeBase, KnowledgeError, load_knowledge
from core.retrieval import MODES, Mode, RetrievalError, Retriever

DEFAULT_DATA = "../shared/data/bitext-support/Bitext_Sample_Customer_Support_Training_Dataset.csv"
DEFAULT_KNOWLEDGE = "knowledge"
DEFAULT_CACHE = "data/cache"
GOAL_RECALL_AT_3 = 0.85
MODE_LABELS: dict[Mode, str] = {"dense": "embeddings", "bm25": "bm25", "hybrid": "hybrid"}


class EvalDataError(Exception):
    """Unusable evaluation input; the message names the file (and line)."""


@dataclass(frozen=True, slots=True)
class Request:
    text: str
    intent: str
    line: int


def load_intent_map(path: Path, kb: KnowledgeBase) -> dict[str, tuple[str, ...]]:
    """Read ``[intents] name = ["article-id", ...]``; every id must exist in the base."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvalDataError(f"{path}: intent map not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise EvalDataError(f"{path}: not valid TOML ({exc})") from None
    table = data.get("intents")
    if not isinstance(table, dict) or not table:
        raise EvalDataError(f"{path}: missing the [intents] table")
    known = set(kb.ids())
    mapping: dict[str, tuple[str, ...]] = {}
    for intent, ids in table.items():
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise EvalDataError(f"{path}: intent '{intent}' must list one or more article ids")
        missing = [i for i in ids if i not in known]
        if missing:
            raise EvalDataError(
                f"{path}: intent '{intent}' names unknown article(s): {', '.join(missing)}"
            )
        mapping[intent] = tuple(ids)
    return mapping


def load_requests(path: Path, intents: dict[str, tuple[str, ...]]) -> list[Request]:
    """Read the Bitext CSV (columns ``instruction`` and ``intent``)."""
    if not path.is_file():
        raise EvalDataError(f"{path}: data file not found (pass --data PATH to the Bitext CSV)")
    requests: list[Request] = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or ())
        if not {"instruction", "intent"} <= columns:
            raise EvalDataError(
                f"{path}: expected the columns 'instruction' and 'intent', found "
                f"{', '.join(sorted(columns)) or 'none'}"
            )
        for row in reader:
            line = reader.line_num
            text = (row.get("instruction") or "").strip()
            intent = (row.get("intent") or "").strip()
            if not text or not intent:
                raise EvalDataError(f"{path}, line {line}: empty instruction or intent")
            if intent not in intents:
                raise EvalDataError(
                    f"{path}, line {line}: intent '{intent}' is not in the intent map"
                )
            requests.append(Request(text=text, intent=intent, line=line))
    if not requests:
        raise EvalDataError(f"{path}: no requests")
    return requests


def recall(rankings: list[list[str]], gold: list[tuple[str, ...]], k: int) -> float:
    hits = sum(1 for ranked, ids in zip(rankings, gold, strict=True) if set(ranked[:k]) & set(ids))
    return hits / len(gold)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=DEFAULT_DATA, help="Bitext CSV (instruction, intent)")
    parser.add_argument("--knowledge", default=DEFAULT_KNOWLEDGE, help="knowledge-base folder")
    parser.add_argument(
        "--intent-map", default=None, help="intent -> article ids (KNOWLEDGE/intent_map.toml)"
    )
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE, help="passage embedding cache")
    parser.add_argument(
        "--per-intent", action="store_true", help="also print Recall@3 per intent for each method"
    )


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    knowledge = Path(args.knowledge)
    intent_map_path = Path(args.intent_map) if args.intent_map else knowledge / "intent_map.toml"
    try:
        kb = load_knowledge(knowledge)
        intents = load_intent_map(intent_map_path, kb)
        requests = load_requests(Path(args.data), intents)
        retriever = Retriever(knowledge, args.cache_dir)
    except (EvalDataError, KnowledgeError, RetrievalError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rankings = retriever.rank_articles([r.text for r in requests])
    gold = [intents[r.intent] for r in requests]

    print(
        f"Retrieval over {len(requests)} requests ({len(intents)} intents) from {args.data}; "
        f"{len(kb)} articles, {len(retriever.passages)} passages"
    )
    print(f"{'method':<12}{'Recall@1':>10}{'Recall@3':>10}")
    best: tuple[float, Mode] = (-1.0, "hybrid")
    for mode in MODES:
        r1, r3 = recall(rankings[mode], gold, 1), recall(rankings[mode], gold, 3)
        print(f"{MODE_LABELS[mode]:<12}{r1:>10.3f}{r3:>10.3f}")
        best = max(best, (r3, mode))
    verdict = "met" if best[0] >= GOAL_RECALL_AT_3 else "NOT met"
    print(
        f"best: {MODE_LABELS[best[1]]} Recall@3 = {best[0]:.3f} "
        f"(goal >= {GOAL_RECALL_AT_3}: {verdict}); {time.perf_counter() - started:.0f} s"
    )
    if args.per_intent:
        _print_per_intent(requests, gold, rankings)
    return 0


def _print_per_intent(
    requests: list[Request], gold: list[tuple[str, ...]], rankings: dict[Mode, list[list[str]]]
) -> None:
    rows: dict[str, list[int]] = defaultdict(list)
    for i, request in enumerate(requests):
        rows[request.intent].append(i)
    print(f"\n{'intent (Recall@3)':<28}" + "".join(f"{MODE_LABELS[m]:>12}" for m in MODES))
    for intent in sorted(rows):
        cells = []
        for mode in MODES:
            picked = rows[intent]
            score = recall([rankings[mode][i] for i in picked], [gold[i] for i in picked], 3)
            cells.append(f"{score:>12.3f}")
        print(f"{intent:<28}" + "".join(cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="supportbot eval retrieval", description=__doc__.splitlines()[0] if __doc__ else None
    )
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
