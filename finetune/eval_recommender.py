"""`supportbot eval recommender`: Recall@10 and NDCG@10 of the recommender's models on real
implicit feedback.

``--dataset msweb`` (default; ``--data`` is the folder with ``train_interactions.csv`` and
``items.csv``): every user with at least 2 visits has one visit held out at random (fixed
seed). ``--dataset movielens`` (``--data`` is ``ratings.csv``): ratings >= 4 are positives
and the latest part of each user's positives, by time, is held out. Random, popularity,
item-item, ALS, BPR, EASE and the hybrid blend of the service are scored in one table; the
models are the service's own (:class:`core.recommender.CFModel`), so the figures describe
what runs in the chat.

``--validate`` scores the same models on a validation hold-out carved from the training
part only (one more training visit of each user who has two or more, seed ``--seed`` + 1),
so hyper-parameters can be chosen without looking at the test hold-out.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import sparse

from core.recommender import (
    MODEL_KINDS,
    CFModel,
    CFParams,
    HybridConfig,
    Interactions,
    ModelKind,
    blend,
)

DATASETS = ("msweb", "movielens")
DEFAULT_DATA = {
    "msweb": "../shared/data/msweb",
    "movielens": "../shared/data/movielens-small/ratings.csv",
}
GOAL_LIFT = 1.3
"""The best model should reach this multiple of popularity's Recall@10."""
EVAL_BLEND = (0.85, 0.05, 0.1)
"""Hybrid weights (collaborative model, title content, popularity) for these data sets, with
EASE as the collaborative part (:data:`HYBRID_MODEL`), chosen on the msweb validation
hold-out carved from the training visits (``--validate``). The service weighs content more
(0.6): there the content is the customer's own question, here only the titles of pages
visited before."""
HYBRID_MODEL: ModelKind = "ease"
MODELS = ("random", "popularity", "item-item", "als", "bpr", "ease", "hybrid")
BATCH = 2048


class EvalDataError(Exception):
    """Unusable evaluation input; the message names the file (and line)."""


@dataclass(frozen=True, slots=True)
class Split:
    """Training interactions and, per test user (a row of the training matrix), the held-out
    items (columns)."""

    name: str
    train: Interactions
    test_rows: np.ndarray
    test_items: tuple[np.ndarray, ...]
    titles: tuple[str, ...]
    """Item texts aligned with ``train.items`` (empty when unknown), for the content part."""


# -- reading the data ------------------------------------------------------------------------


def _rows(path: Path, columns: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line, row) of a CSV with the given columns; a missing column or value names the line."""
    try:
        handle = path.open(encoding="utf-8", newline="")
    except FileNotFoundError:
        raise EvalDataError(f"{path}: file not found") from None
    with handle:
        reader = csv.DictReader(handle)
        found = set(reader.fieldnames or ())
        if not set(columns) <= found:
            raise EvalDataError(
                f"{path}: expected the columns {', '.join(columns)}; found "
                f"{', '.join(sorted(found)) or 'none'}"
            )
        for row in reader:
            if any(not (row.get(c) or "").strip() for c in columns):
                empty = next(c for c in columns if not (row.get(c) or "").strip())
                raise EvalDataError(f"{path}, line {reader.line_num}: empty '{empty}'")
            yield reader.line_num, row


def load_msweb(folder: Path, seed: int) -> Split:
    """Hold out one random visit of every user with at least two (fixed seed)."""
    if not folder.is_dir():
        raise EvalDataError(
            f"{folder}: data folder not found (pass --data with train_interactions.csv and "
            "items.csv)"
        )
    titles: dict[str, str] = {}
    for _, row in _rows(folder / "items.csv", ("item_id", "title")):
        titles[row["item_id"].strip()] = row["title"].strip()
    visits: dict[str, list[str]] = {}
    interactions_path = folder / "train_interactions.csv"
    for line, row in _rows(interactions_path, ("user_id", "item_id")):
        item = row["item_id"].strip()
        if item not in titles:
            raise EvalDataError(
                f"{interactions_path}, line {line}: item '{item}' is not in items.csv"
            )
        items = visits.setdefault(row["user_id"].strip(), [])
        if item not in items:
            items.append(item)
    if not visits:
        raise EvalDataError(f"{interactions_path}: no visits")
    rng = np.random.default_rng(seed)
    train: list[tuple[str, str, float]] = []
    held: dict[str, list[str]] = {}
    for user, items in visits.items():
        out = int(rng.integers(len(items))) if len(items) >= 2 else -1
        for i, item in enumerate(items):
            if i == out:
                held[user] = [item]
            else:
                train.append((user, item, 1.0))
    return _split("msweb", train, held, list(titles), titles)


def load_movielens(path: Path, min_rating: float, holdout: float) -> Split:
    """Ratings >= ``min_rating`` are positives; each user's latest ``holdout`` share of them
    (at least one, for users with two or more) is held out."""
    if path.is_dir():
        path = path / "ratings.csv"
    if not path.is_file():
        raise EvalDataError(f"{path}: ratings file not found (pass --data PATH/ratings.csv)")
    positives: dict[str, list[tuple[int, int, str]]] = {}
    every_item: dict[str, None] = {}
    for line, row in _rows(path, ("userId", "movieId", "rating", "timestamp")):
        try:
            rating, stamp = float(row["rating"]), int(row["timestamp"])
        except ValueError:
            raise EvalDataError(
                f"{path}, line {line}: rating or timestamp is not a number"
            ) from None
        item = row["movieId"].strip()
        every_item[item] = None
        if rating >= min_rating:
            positives.setdefault(row["userId"].strip(), []).append((stamp, line, item))
    if not positives:
        raise EvalDataError(f"{path}: no ratings >= {min_rating}")
    titles = _movie_titles(path.parent / "movies.csv")
    train: list[tuple[str, str, float]] = []
    held: dict[str, list[str]] = {}
    for user, rows in positives.items():
        rows.sort()
        cut = len(rows) - max(1, int(len(rows) * holdout)) if len(rows) >= 2 else len(rows)
        train.extend((user, item, 1.0) for _, _, item in rows[:cut])
        if cut < len(rows):
            held[user] = [item for _, _, item in rows[cut:]]
    return _split("movielens", train, held, list(every_item), titles)


def _movie_titles(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    titles: dict[str, str] = {}
    for _, row in _rows(path, ("movieId", "title")):
        genres = (row.get("genres") or "").replace("|", ", ")
        titles[row["movieId"].strip()] = f"{row['title'].strip()} ({genres})"
    return titles


def _split(
    name: str,
    train: list[tuple[str, str, float]],
    held: dict[str, list[str]],
    items: list[str],
    titles: dict[str, str],
) -> Split:
    data = Interactions.build(train, items)
    user_row = {user: i for i, user in enumerate(data.users)}
    item_col = {item: i for i, item in enumerate(data.items)}
    rows: list[int] = []
    targets: list[np.ndarray] = []
    for user, items_out in held.items():
        if user in user_row:
            rows.append(user_row[user])
            targets.append(np.asarray([item_col[i] for i in items_out], dtype=np.int64))
    if not rows:
        raise EvalDataError(f"{name}: no user has enough interactions to hold one out")
    return Split(
        name, data, np.asarray(rows, dtype=np.int64), tuple(targets),
        tuple(titles.get(i, "") for i in data.items),
    )


def validation_split(split: Split, seed: int) -> Split:
    """Hold out one random training item of every test user who has two or more: a
    validation split that never sees the test hold-out (only users and weights of the
    training part are used)."""
    matrix = split.train.matrix.tocsr()
    rng = np.random.default_rng(seed)
    keep = np.ones(matrix.nnz, dtype=bool)
    rows: list[int] = []
    targets: list[np.ndarray] = []
    for row in split.test_rows:
        start, end = int(matrix.indptr[row]), int(matrix.indptr[row + 1])
        if end - start >= 2:
            out = start + int(rng.integers(end - start))
            keep[out] = False
            rows.append(int(row))
            targets.append(np.asarray([matrix.indices[out]], dtype=np.int64))
    if not rows:
        raise EvalDataError(f"{split.name}: no test user has two training items to validate on")
    coo = matrix.tocoo()
    kept = sparse.csr_matrix(
        (coo.data[keep], (coo.row[keep], coo.col[keep])), shape=matrix.shape, dtype=np.float32
    )
    train = Interactions(split.train.users, split.train.items, kept)
    return Split(
        f"{split.name} validation", train, np.asarray(rows, dtype=np.int64), tuple(targets),
        split.titles,
    )


# -- scoring ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    model: str
    recall: float
    ndcg: float
    seconds: float


def top_k(scores: np.ndarray, seen: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` best columns of each row, best first, after removing ``seen`` (a 0/1 matrix
    of the users' training items)."""
    scores = np.where(seen > 0, -np.inf, scores)
    k = min(k, scores.shape[1])
    head = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, head, axis=1), axis=1, kind="stable")
    return np.take_along_axis(head, order, axis=1)


def metrics(
    ranked: Sequence[np.ndarray], targets: Sequence[np.ndarray], k: int
) -> tuple[float, float]:
    """Mean Recall@k (hits / min(k, held out)) and NDCG@k over users."""
    recall = ndcg = 0.0
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    for top, target in zip(ranked, targets, strict=True):
        hits = np.isin(top[:k], target)
        recall += hits.sum() / min(k, len(target))
        ideal = discounts[: min(k, len(target))].sum()
        ndcg += float(discounts[: len(hits)][hits].sum()) / ideal
    return recall / len(targets), ndcg / len(targets)


def evaluate(
    split: Split, score: Callable[[np.ndarray], np.ndarray], k: int
) -> tuple[float, float]:
    """Metrics of a scorer (training rows -> scores per item), in batches of users."""
    ranked: list[np.ndarray] = []
    for start in range(0, len(split.test_rows), BATCH):
        rows = split.test_rows[start : start + BATCH]
        seen = split.train.matrix[rows].toarray()
        ranked.extend(top_k(score(rows), seen, k))
    return metrics(ranked, split.test_items, k)


def _content_profiles(split: Split, encode: Callable[[Sequence[str]], np.ndarray]) -> np.ndarray:
    """Each item's title vector; a user's content score for an item is its similarity to
    the mean of the user's training items (the eval's stand-in for a conversation)."""
    return encode([t or "item" for t in split.titles])


def hybrid_scorer(
    split: Split, cf: CFModel, config: HybridConfig, vectors: np.ndarray | None, k: int
) -> Callable[[np.ndarray], np.ndarray]:
    """The service's :func:`blend` for each test user, turned back into scores by rank."""
    items = split.train.items
    index = {item: i for i, item in enumerate(items)}
    popularity = cf.popularity

    def score(rows: np.ndarray) -> np.ndarray:
        cf_scores = cf.batch_scores(rows)
        out = np.zeros((len(rows), len(items)), dtype=np.float32)
        for j, row in enumerate(rows):
            seen_cols = split.train.matrix[row].indices
            content: dict[str, float] = {}
            if vectors is not None and len(seen_cols):
                profile = vectors[seen_cols].mean(axis=0)
                similarity = vectors @ (profile / max(float(np.linalg.norm(profile)), 1e-12))
                similarity[seen_cols] = -1.0
                best = np.argsort(-similarity)[: config.content_passages]
                content = {items[c]: float(similarity[c]) for c in best if similarity[c] > 0}
            ranked = blend(
                items, index, content=content, cf=cf_scores[j], popularity=popularity,
                exclude=[items[c] for c in seen_cols], config=config, limit=k,
            )
            for place, r in enumerate(ranked):
                out[j, index[r.item_id]] = len(ranked) - place
        return out

    return score


def run_models(
    split: Split,
    params: CFParams,
    config: HybridConfig,
    k: int,
    seed: int,
    encode: Callable[[Sequence[str]], np.ndarray] | None,
    log: Callable[[str], None] = lambda _: None,
) -> list[Result]:
    """Train and score every model of :data:`MODELS` on one split."""
    results: list[Result] = []
    models: dict[str, CFModel] = {}

    def timed(name: str, fit: Callable[[], Callable[[np.ndarray], np.ndarray]]) -> None:
        started = time.perf_counter()
        scorer = fit()
        recall, ndcg = evaluate(split, scorer, k)
        results.append(Result(name, recall, ndcg, time.perf_counter() - started))
        log(f"{name}: Recall@{k} {recall:.4f}")

    rng = np.random.default_rng(seed)
    n_items = len(split.train.items)
    timed("random", lambda: lambda rows: rng.random((len(rows), n_items)))
    popularity = np.asarray((split.train.matrix > 0).sum(axis=0)).reshape(-1).astype(np.float32)
    timed("popularity", lambda: lambda rows: np.broadcast_to(popularity, (len(rows), n_items)))
    kinds: tuple[ModelKind, ...] = ("item-item", "als", "bpr", "ease")
    for kind in kinds:
        def fit(kind: ModelKind = kind) -> Callable[[np.ndarray], np.ndarray]:
            models[kind] = CFModel(split.train, replace(params, kind=kind))
            return models[kind].batch_scores

        timed(kind, fit)

    def fit_hybrid() -> Callable[[np.ndarray], np.ndarray]:
        cf = models.get(config.cf.kind) or CFModel(split.train, config.cf)
        vectors = _content_profiles(split, encode) if encode is not None else None
        return hybrid_scorer(split, cf, config, vectors, k)

    timed("hybrid", fit_hybrid)
    return results


def format_table(results: Sequence[Result], k: int) -> str:
    popularity = next((r.recall for r in results if r.model == "popularity"), 0.0)
    lines = [f"{'model':<12}{f'Recall@{k}':>11}{f'NDCG@{k}':>10}{'x popularity':>14}{'time s':>9}"]
    for r in results:
        lift = f"{r.recall / popularity:.2f}x" if popularity > 0 else "-"
        lines.append(f"{r.model:<12}{r.recall:>11.4f}{r.ndcg:>10.4f}{lift:>14}{r.seconds:>9.1f}")
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    defaults = CFParams()
    parser.add_argument("--dataset", choices=DATASETS, default="msweb")
    parser.add_argument(
        "--data", default=None,
        help="msweb: folder with train_interactions.csv and items.csv; movielens: ratings.csv "
        f"(defaults: {DEFAULT_DATA['msweb']}, {DEFAULT_DATA['movielens']})",
    )
    parser.add_argument("--k", type=int, default=10, help="list length scored (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="hold-out and model seed")
    parser.add_argument("--min-rating", type=float, default=4.0, help="movielens positives")
    parser.add_argument(
        "--holdout", type=float, default=0.2,
        help="movielens: share of each user's latest positives held out (default 0.2)",
    )
    parser.add_argument("--factors", type=int, default=defaults.factors)
    parser.add_argument("--iterations", type=int, default=defaults.iterations)
    parser.add_argument("--regularization", type=float, default=defaults.regularization)
    parser.add_argument("--alpha", type=float, default=defaults.alpha, help="ALS confidence")
    parser.add_argument("--bpr-factors", type=int, default=defaults.bpr_factors)
    parser.add_argument("--bpr-learning-rate", type=float, default=defaults.bpr_learning_rate)
    parser.add_argument(
        "--bpr-regularization", type=float, default=defaults.bpr_regularization
    )
    parser.add_argument("--bpr-iterations", type=int, default=defaults.bpr_iterations)
    parser.add_argument("--neighbours", type=int, default=defaults.neighbours)
    parser.add_argument(
        "--ease-l2", type=float, default=defaults.ease_l2,
        help="EASE ridge penalty, a multiple of the mean item count",
    )
    parser.add_argument(
        "--validate", action="store_true",
        help="score on a validation hold-out carved from the training part (seed + 1) "
        "instead of the test hold-out, to choose hyper-parameters",
    )
    parser.add_argument("--threads", type=int, default=1, help="training threads")
    cf, content, popular = EVAL_BLEND
    parser.add_argument(
        "--hybrid-model", choices=MODEL_KINDS, default=HYBRID_MODEL,
        help=f"hybrid: the collaborative model (default {HYBRID_MODEL})",
    )
    parser.add_argument(
        "--cf-weight", type=float, default=cf, help="hybrid: collaborative-model weight"
    )
    parser.add_argument(
        "--content-weight", type=float, default=content, help="hybrid: title-content weight"
    )
    parser.add_argument(
        "--popularity-weight", type=float, default=popular, help="hybrid: popularity weight"
    )
    parser.add_argument(
        "--no-content", action="store_true",
        help="leave the MiniLM title matching out of the hybrid (no encoder load)",
    )


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    data = Path(args.data or DEFAULT_DATA[args.dataset])
    try:
        params = CFParams(
            factors=args.factors, iterations=args.iterations,
            regularization=args.regularization, alpha=args.alpha,
            bpr_factors=args.bpr_factors, bpr_learning_rate=args.bpr_learning_rate,
            bpr_regularization=args.bpr_regularization, bpr_iterations=args.bpr_iterations,
            neighbours=args.neighbours, ease_l2=args.ease_l2, threads=args.threads,
            seed=args.seed,
        )
        config = HybridConfig(
            cf=replace(params, kind=args.hybrid_model), cf_weight=args.cf_weight,
            content_weight=args.content_weight, popularity_weight=args.popularity_weight,
        )
        if args.k <= 0 or not 0 < args.holdout < 1:
            raise ValueError("--k must be positive and --holdout between 0 and 1")
        if args.dataset == "msweb":
            split = load_msweb(data, args.seed)
            protocol = f"one visit per user held out at random (seed {args.seed})"
        else:
            split = load_movielens(data, args.min_rating, args.holdout)
            protocol = (f"latest {args.holdout:.0%} of each user's ratings >= "
                        f"{args.min_rating:g} held out")
        if args.validate:
            split = validation_split(split, args.seed + 1)
            protocol += (f"; VALIDATION: one more training item per user held out "
                         f"(seed {args.seed + 1}), the test hold-out unused")
    except (EvalDataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    encode = None
    if not args.no_content and any(split.titles):
        from core.retrieval import MiniLMEncoder

        encode = MiniLMEncoder().encode
    train = split.train
    print(
        f"{split.name} ({data}): {len(split.test_rows):,} test users, {len(train.items):,} "
        f"items, {train.matrix.nnz:,} training interactions of {len(train.users):,} users; "
        f"{protocol}"
    )
    print(
        f"models: ALS {params.factors} factors, {params.iterations} iterations, alpha "
        f"{params.alpha:g}, reg {params.regularization:g} per pair; BPR {params.bpr_factors} "
        f"factors, "
        f"{params.bpr_iterations} iterations; item-item cosine K={params.neighbours}; EASE "
        f"L2 {params.ease_l2:g} x mean item count; hybrid = "
        f"{config.cf_weight:g} {config.cf.kind.upper()} + "
        f"{0 if encode is None else config.content_weight:g} title content + "
        f"{config.popularity_weight:g} popularity"
    )
    results = run_models(split, params, config, args.k, args.seed, encode)
    print(format_table(results, args.k))
    popularity = next(r.recall for r in results if r.model == "popularity")
    best = max((r for r in results if r.model not in ("random", "popularity")),
               key=lambda r: r.recall)
    lift = best.recall / popularity if popularity > 0 else math.inf
    verdict = "met" if lift >= GOAL_LIFT else "NOT met"
    print(
        f"best: {best.model} Recall@{args.k} = {best.recall:.4f} = {lift:.2f}x popularity "
        f"(goal >= {GOAL_LIFT}x: {verdict}); {time.perf_counter() - started:.0f} s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="supportbot eval recommender", description=__doc__.splitlines()[0] if __doc__ else None
    )
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
