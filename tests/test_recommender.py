"""The hybrid recommender on a real SQLite store, real ``implicit`` models and the real
MiniLM retriever over hand-written fixture articles and click logs."""

from __future__ import annotations

import asyncio
import csv
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import recommender as recommender_bench
from bots import cli
from core.grounding import Grounder
from core.knowledge import KnowledgeBase
from core.messages import Inbound, Suggestion, User
from core.recommender import (
    CFModel,
    CFParams,
    HybridConfig,
    HybridRecommender,
    Interactions,
    SuggestionRequest,
    arm_of,
)
from core.retrieval import MiniLMEncoder, Retriever
from core.store import SQLiteStore, StoredInbound
from core.suggestions import RetrieverContent, build_default_recommender
from finetune import eval_recommender
from tests.conftest import make_settings, wait_for

FIXTURES = Path(__file__).parent / "fixtures" / "recommender"
KB = FIXTURES / "kb"


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    return MiniLMEncoder()


@pytest.fixture(scope="module")
def retriever(minilm: MiniLMEncoder, tmp_path_factory: pytest.TempPathFactory) -> Retriever:
    return Retriever(KB, tmp_path_factory.mktemp("recommender-cache"), encoder=minilm)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "supportbot.db")
    await store.open()
    yield store
    await store.close()


class Customers:
    """Customers created the way the pipeline creates them: by recording their messages."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.known: dict[str, StoredInbound] = {}
        self.sent = 0

    async def say(self, name: str, conversation: str = "") -> StoredInbound:
        self.sent += 1
        stored = await self.store.record_inbound(
            Inbound("web", f"{name}-{conversation or 'chat'}", User("web", name),
                    f"message-{self.sent}", "hello")
        )
        assert stored is not None
        return stored

    async def get(self, name: str) -> StoredInbound:
        if name not in self.known:
            self.known[name] = await self.say(name)
        return self.known[name]

    async def log(self, name: str, kind: str, item: str, value: str | None = None) -> None:
        who = await self.get(name)
        await self.store.log_event(
            kind,  # type: ignore[arg-type]
            user_id=who.user_id, conversation_id=who.conversation_id, item_id=item, value=value,
        )

    async def load(self, path: Path) -> int:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        for row in rows:
            await self.log(row["customer"], row["type"], row["item"], row["value"] or None)
        return len(rows)

    async def shown(self, who: StoredInbound, suggestions: Sequence[Suggestion]) -> None:
        """Log a suggestion list exactly as the pipeline does after a reply."""
        await self.store.log_events([
            {"type": "suggestion_shown", "user_id": who.user_id,
             "conversation_id": who.conversation_id, "item_id": s.id, "position": i}
            for i, s in enumerate(suggestions)
        ])


@pytest.fixture
def customers(store: SQLiteStore) -> Customers:
    return Customers(store)


@pytest.fixture
async def make(
    retriever: Retriever, store: SQLiteStore
) -> AsyncIterator[Callable[..., HybridRecommender]]:
    made: list[HybridRecommender] = []

    def factory(content: Any = None, **config: Any) -> HybridRecommender:
        recommender = HybridRecommender(
            content or RetrieverContent(retriever), HybridConfig(**{"exploration": 0.0, **config})
        )
        recommender.attach_store(store)
        made.append(recommender)
        return recommender

    yield factory
    for recommender in made:
        await recommender.close()


def ids(suggestions: Sequence[Suggestion]) -> list[str]:
    return [s.id for s in suggestions]


def request(who: StoredInbound, text: str = "") -> SuggestionRequest:
    return SuggestionRequest(who.user_id, who.conversation_id, text)


async def test_clicks_change_suggestions_after_retraining(customers: Customers, make) -> None:
    await customers.load(FIXTURES / "clicks.csv")
    await customers.log("carol", "suggestion_clicked", "refunds")
    carol = await customers.get("carol")
    recommender = make()
    await recommender.retrain()
    before = ids(await recommender.suggest(request(carol), 3))
    assert len(before) == 3 and "cancel-order" not in before

    # Six customers open "refunds" and then "cancel-order": nothing changes until retraining.
    await customers.load(FIXTURES / "refund_clicks.csv")
    assert ids(await recommender.suggest(request(carol), 3)) == before
    model = await recommender.retrain()
    assert model.matrix.nnz > 0 and "cancel-order" in model.items

    after = await recommender.suggest(request(carol), 3)
    assert after[0].id == "cancel-order"
    assert arm_of(after[0]) == "cf"
    # Popularity alone would still put "delivery-times" (10 customers) above it (6).
    stranger = await customers.get("stranger")
    assert ids(await recommender.suggest(request(stranger), 3))[0] == "delivery-times"


async def test_a_new_article_is_suggested_by_content_before_anyone_clicked_it(
    customers: Customers, store: SQLiteStore, make
) -> None:
    # Cold start: an empty log and no model yet.
    recommender = make()
    dave = await customers.get("dave")
    first = await recommender.suggest(request(dave, "I forgot my password and cannot log in"), 3)
    assert recommender.model is None
    assert first[0].id == "reset-password" and arm_of(first[0]) == "content"

    await customers.load(FIXTURES / "clicks.csv")
    await recommender.retrain()
    question = "Can I buy a gift card as a present for my sister?"
    suggestions = await recommender.suggest(request(dave, question), 3)
    assert suggestions[0].id == "gift-cards" and arm_of(suggestions[0]) == "content"
    assert suggestions[0].title == "Buying and using gift cards"
    assert suggestions[0].url == "https://help.example.com/gift-cards"
    clicks = await store.query("SELECT COUNT(*) AS n FROM events WHERE item_id = 'gift-cards'")
    assert clicks[0]["n"] == 0


async def test_the_content_step_reuses_the_grounders_query_embedding(
    minilm: MiniLMEncoder, tmp_path: Path, customers: Customers, make
) -> None:
    encoded: list[str] = []

    class Counting:
        def encode(self, texts: Sequence[str]) -> np.ndarray:
            encoded.extend(texts)
            return minilm.encode(texts)

    shared = Retriever(KB, tmp_path / "cache", encoder=Counting())
    grounder = Grounder(shared, "You help customers of a shop.", reload_interval_s=0)
    recommender = make(RetrieverContent(shared))
    erin = await customers.get("erin")
    earlier = ("hello", "I ordered a lamp last week, order 55512345")
    question = "Can I buy a gift card for order 55512345 as a present?"
    await grounder.ground("warm up")  # embeds the small-talk exemplars once
    encoded.clear()
    grounding = await grounder.ground(question, earlier)
    assert grounding.citations[0].id == "gift-cards"
    assert len(encoded) == 2  # the question and the recent turns, ids left out
    suggestions = await recommender.suggest(
        SuggestionRequest(erin.user_id, erin.conversation_id, question, earlier), 3
    )
    assert suggestions[0].id == "gift-cards" and arm_of(suggestions[0]) == "content"
    assert len(encoded) == 2  # nothing encoded again for the suggestions


async def test_clicked_and_already_shown_articles_are_not_suggested_again(
    customers: Customers, make
) -> None:
    await customers.load(FIXTURES / "clicks.csv")
    await customers.log("erin", "suggestion_clicked", "refunds")
    recommender = make()
    await recommender.retrain()
    erin = await customers.get("erin")
    question = "My item arrived broken, I want my money back"

    stranger = await customers.get("someone-else")
    assert ids(await recommender.suggest(request(stranger, question), 3))[0] == "refunds"
    first = await recommender.suggest(request(erin, question), 3)
    assert "refunds" not in ids(first) and len(first) == 3

    await customers.shown(erin, first)
    second = await recommender.suggest(request(erin, question), 3)
    assert second and not set(ids(second)) & set(ids(first))
    assert "refunds" not in ids(second)

    # Shown (not clicked) articles may come back in a new conversation; clicked ones never.
    later = await customers.say("erin", conversation="next-week")
    assert later.user_id == erin.user_id and later.conversation_id != erin.conversation_id
    third = await recommender.suggest(request(later, question), 3)
    assert set(ids(third)) & set(ids(first)) and "refunds" not in ids(third)


async def test_exploration_sometimes_shows_an_unseen_article_with_a_fixed_seed(
    customers: Customers, make
) -> None:
    await customers.load(FIXTURES / "clicks.csv")
    explorer, again, steady = (
        make(exploration=0.25, seed=3), make(exploration=0.25, seed=3), make(exploration=0.0)
    )
    for recommender in (explorer, again, steady):
        await recommender.retrain()
    runs: dict[str, list[list[tuple[str, str]]]] = {"explorer": [], "again": [], "steady": []}
    for i in range(40):
        who = await customers.get(f"visitor-{i}")
        for name, recommender in (("explorer", explorer), ("again", again), ("steady", steady)):
            shown = await recommender.suggest(request(who), 3)
            runs[name].append([(s.id, arm_of(s)) for s in shown])
    explored = [item for run in runs["explorer"] for item, arm in run if arm == "explore"]
    assert 4 <= len(explored) <= 20  # about a quarter of 40 lists
    assert "gift-cards" in explored  # never clicked, never shown before
    assert runs["again"] == runs["explorer"]  # same seed, same choices
    steady_items = {item for run in runs["steady"] for item, _ in run}
    assert "gift-cards" not in steady_items
    assert all(arm != "explore" for run in runs["steady"] for _, arm in run)


class GatedContent:
    """The real content matcher, held at a gate so that a retrain can land mid-call."""

    def __init__(self, inner: RetrieverContent) -> None:
        self.inner = inner
        self.armed = False
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    @property
    def knowledge(self) -> KnowledgeBase:
        return self.inner.knowledge

    async def match(self, text: str, recent: Sequence[str], passages: int) -> dict[str, float]:
        if self.armed:
            self.entered.set()
            await self.release.wait()
        return await self.inner.match(text, recent, passages)

    async def refresh(self) -> bool:
        return await self.inner.refresh()


async def test_a_retrain_swaps_the_model_atomically_under_running_suggest_calls(
    customers: Customers, retriever: Retriever, make
) -> None:
    await customers.load(FIXTURES / "clicks.csv")
    await customers.log("carol", "suggestion_clicked", "refunds")
    carol = await customers.get("carol")
    gated = GatedContent(RetrieverContent(retriever))
    recommender = make(content=gated)
    old_model = await recommender.retrain()
    text = "thanks"
    old = ids(await recommender.suggest(request(carol, text), 3))

    await customers.load(FIXTURES / "refund_clicks.csv")
    gated.armed = True
    in_flight = asyncio.create_task(recommender.suggest(request(carol, text), 3))
    await asyncio.wait_for(gated.entered.wait(), 10)
    new_model = await recommender.retrain()
    assert recommender.model is new_model and new_model is not old_model
    gated.release.set()
    assert ids(await in_flight) == old  # begun on the old model, finished on it
    gated.armed = False
    new = ids(await recommender.suggest(request(carol, text), 3))
    assert new != old and new[0] == "cancel-order"

    # Many calls racing with retrains: each sees one whole model, never a mix.
    calls = [recommender.suggest(request(carol, text), 3) for _ in range(30)]
    retrains = [recommender.retrain() for _ in range(3)]
    results = await asyncio.gather(*calls, *retrains)
    assert all(ids(r) in (old, new) for r in results[:30])


def _bulk_clicks(path: Path, users: int, clicks_per_user: int, items: Sequence[str]) -> None:
    """A big click log written straight into the database file (test setup only)."""
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            "INSERT INTO users (id, platform, platform_user_id, created_at) VALUES (?, ?, ?, ?)",
            [(1000 + u, "web", f"bulk-{u}", "2024-01-01T00:00:00+00:00") for u in range(users)],
        )
        conn.executemany(
            "INSERT INTO events (ts, type, user_id, item_id) VALUES (?, ?, ?, ?)",
            [
                ("2024-01-01T00:00:00+00:00", "suggestion_clicked", 1000 + u,
                 items[(u * 7 + c * (u % 5 + 1)) % len(items)])
                for u in range(users) for c in range(clicks_per_user)
            ],
        )
    conn.close()


async def test_retraining_runs_in_a_worker_thread_without_blocking_the_loop(
    store: SQLiteStore, retriever: Retriever, make
) -> None:
    _bulk_clicks(store.path, 8_000, 4, retriever.knowledge.ids())
    recommender = make(cf=CFParams(iterations=25))
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    started = time.perf_counter()
    model = await recommender.retrain()
    took = time.perf_counter() - started
    stop.set()
    await ticker
    assert len(model.users) == 8_000 and model.matrix.nnz > 8_000
    assert took > 0.5, f"training took only {took:.3f} s: too quick to show anything"
    # Blocking the loop shows as one gap as long as the training; a busy machine only adds
    # scattered short ones, so the bound is relative to the training time, not absolute.
    assert max(gaps) < took / 2, f"the loop stalled {max(gaps):.3f} s of {took:.2f} s"


async def test_background_retrain_after_k_new_events_or_after_the_interval(
    customers: Customers, make
) -> None:
    await customers.load(FIXTURES / "clicks.csv")
    recommender = make(retrain_after_events=3, retrain_every_s=3600, poll_s=0.05)
    await recommender.start()
    first = await wait_for(lambda: recommender.model, timeout=20)

    await customers.log("frank", "suggestion_clicked", "refunds")
    await customers.log("frank", "suggestion_clicked", "cancel-order")
    await asyncio.sleep(0.4)
    assert recommender.model is first  # 2 new events < 3

    await customers.log("frank", "article_viewed", "gift-cards")
    second = await wait_for(lambda: recommender.model is not first and recommender.model)
    assert second.last_event_id > first.last_event_id
    assert {"refunds", "cancel-order", "gift-cards"} <= set(second.items)
    assert second.matrix.nnz == first.matrix.nnz + 3

    timed = make(retrain_after_events=1000, retrain_every_s=0.3, poll_s=0.05)
    await timed.start()
    base = await wait_for(lambda: timed.model, timeout=20)
    await customers.log("gina", "suggestion_clicked", "newsletter")
    later = await wait_for(lambda: timed.model is not base and timed.model, timeout=10)
    assert "newsletter" in later.items


async def test_describe_gives_the_article_behind_a_suggestion_id(make) -> None:
    recommender = make()
    article = recommender.describe("reset-password")
    assert article == Suggestion(
        "reset-password", "Resetting your password", "https://help.example.com/reset-password"
    )
    assert recommender.describe("no-such-article") is None


@pytest.mark.parametrize("kind", ["item-item", "ease"])
async def test_the_service_builds_the_recommender_from_its_config(
    tmp_path: Path, store: SQLiteStore, customers: Customers, kind: str
) -> None:
    settings = make_settings(
        tmp_path,
        service={"data_dir": str(tmp_path / "data")},
        recommender={"knowledge_dir": str(KB), "model": kind, "exploration": 0.0,
                     "retrain_after_events": 1},
    )
    await customers.load(FIXTURES / "clicks.csv")
    recommender = await build_default_recommender(settings, store)
    try:
        assert recommender.config.cf.kind == kind
        assert list((tmp_path / "data" / "cache").glob("passages-*.npy"))
        model = await wait_for(lambda: recommender.model, timeout=20)
        assert model.kind == kind and "delivery-times" in model.items
        hana = await customers.get("hana")
        shown = await recommender.suggest(request(hana, "How long does shipping take?"), 3)
        assert shown[0].id == "delivery-times"
    finally:
        await recommender.close()


# -- the offline evaluation ------------------------------------------------------------------


def test_metrics_match_a_hand_computed_example() -> None:
    ranked = [np.array([3, 1, 2]), np.array([0, 4, 5])]
    targets = [np.array([1]), np.array([7, 8])]
    recall, ndcg = eval_recommender.metrics(ranked, targets, 2)
    assert recall == pytest.approx((1 + 0) / 2)
    assert ndcg == pytest.approx((1 / np.log2(3)) / 2)


@pytest.fixture
def msweb_dir(tmp_path: Path) -> Path:
    """The hand-written msweb-format fixture, under the file names the loader expects."""
    folder = tmp_path / "msweb-fixture"
    folder.mkdir()
    shutil.copy(FIXTURES / "msweb" / "items.csv", folder / "items.csv")
    shutil.copy(FIXTURES / "msweb" / "visits_fixture.csv", folder / "train_interactions.csv")
    return folder


def test_msweb_split_holds_out_one_visit_of_every_user_with_two(msweb_dir: Path) -> None:
    split = eval_recommender.load_msweb(msweb_dir, seed=0)
    users_with_two = 17  # u10 has a single visit
    assert len(split.test_rows) == users_with_two
    assert all(len(t) == 1 for t in split.test_items)
    assert split.train.matrix.nnz + users_with_two == 41  # every visit of the file
    assert split.titles[split.train.items.index("1001")] == "Knowledge Base"
    for row, held in zip(split.test_rows, split.test_items, strict=True):
        assert split.train.matrix[row, held[0]] == 0


def test_validation_split_is_carved_from_the_training_part_only(msweb_dir: Path) -> None:
    split = eval_recommender.load_msweb(msweb_dir, seed=0)
    val = eval_recommender.validation_split(split, seed=1)
    train, kept = split.train.matrix, val.train.matrix
    assert val.train.users == split.train.users and val.train.items == split.train.items
    assert kept.nnz == train.nnz - len(val.test_rows)
    counts = np.diff(train.indptr)
    assert len(val.test_rows) == int((counts[split.test_rows] >= 2).sum()) > 0
    held_for_test = {int(r): int(t[0]) for r, t in zip(split.test_rows, split.test_items,
                                                          strict=True)}
    for row, target in zip(val.test_rows, val.test_items, strict=True):
        col = int(target[0])
        assert train[row, col] > 0 and kept[row, col] == 0  # a training visit, now hidden
        assert col != held_for_test[int(row)]  # never the test hold-out
    assert (kept - kept.multiply(train > 0)).nnz == 0  # nothing added


def test_movielens_split_holds_out_each_users_latest_positives() -> None:
    ratings = FIXTURES / "movielens" / "ratings_fixture.csv"
    split = eval_recommender.load_movielens(ratings, 4.0, 0.2)
    items = split.train.items
    held = {
        split.train.users[row]: sorted(items[c] for c in cols)
        for row, cols in zip(split.test_rows, split.test_items, strict=True)
    }
    assert held["1"] == ["5"]  # 1, 2, 3, 5 are >= 4 (4 got a 2); 5 is the latest
    assert held["5"] == ["8"]  # 10 got a 1
    assert "10" in items  # a rated item without positives still has a column


def test_eval_prints_the_table_for_every_model(
    capsys: pytest.CaptureFixture[str], msweb_dir: Path
) -> None:
    argv = ["--data", str(msweb_dir), "--seed", "0", "--k", "3"]
    assert eval_recommender.main(argv) == 0
    out = capsys.readouterr().out
    assert "17 test users, 10 items" in out
    assert "Recall@3" in out and "NDCG@3" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line[:1].isalpha()}
    for model in eval_recommender.MODELS:
        recall, ndcg = float(rows[model][0]), float(rows[model][1])
        assert 0 <= ndcg <= recall <= 1  # one held-out visit: NDCG is at most a hit
    assert rows["popularity"][2] == "1.00x"
    # The fixture's visitors come in groups (support, downloads, Office): co-visits beat
    # popularity.
    assert float(rows["item-item"][0]) > float(rows["popularity"][0])
    assert float(rows["ease"][0]) > float(rows["popularity"][0])
    assert "hybrid = 0.85 EASE + 0.05 title content + 0.1 popularity" in out
    assert "best: " in out and "goal >= 1.3x" in out


def test_eval_on_movielens_through_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    data = FIXTURES / "movielens" / "ratings_fixture.csv"
    assert cli.main(["eval", "recommender", "--dataset", "movielens", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "latest 20% of each user's ratings >= 4 held out" in out
    assert all(f"\n{m} " in out for m in eval_recommender.MODELS)


def test_eval_names_a_missing_path_and_a_bad_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere"
    assert eval_recommender.main(["--data", str(missing)]) == 2
    assert f"{missing}: data folder not found" in capsys.readouterr().err
    folder = tmp_path / "msweb"
    folder.mkdir()
    (folder / "items.csv").write_text("item_id,title,url\n1000,Support,/support\n")
    (folder / "train_interactions.csv").write_text("user_id,item_id\nu1,1000\nu1,1999\n")
    assert eval_recommender.main(["--data", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'train_interactions.csv'}, line 3: item '1999' is not in items.csv" in err
    ratings = tmp_path / "ratings.csv"
    ratings.write_text("userId,movieId,rating,timestamp\n1,1,four,964982703\n")
    assert eval_recommender.main(["--dataset", "movielens", "--data", str(ratings)]) == 2
    assert f"{ratings}, line 2: rating or timestamp is not a number" in capsys.readouterr().err


async def test_the_recommender_bench_runs_small_and_prints_every_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = recommender_bench.parse_args([
        "--users", "300", "--items", "40", "--events", "3000", "--requests", "30",
        "--cold-requests", "5", "--concurrency", "4", "--distinct", "10",
        "--workdir", str(tmp_path),
    ])
    await recommender_bench.main(args)
    out = capsys.readouterr().out
    assert "300 users, 40 items, 3,000 positive events" in out
    assert "| read + fit (what a background retrain costs) |" in out
    for label in ("baseline: popularity only", "hybrid, query embedding cached",
                  "hybrid, cold query embedding", "hybrid, cold, 4 at once"):
        assert f"| {label}" in out
    assert "goal p99 <= 5 ms with the grounder's cached embedding:" in out


# -- EASE ------------------------------------------------------------------------------------


def test_ease_weights_are_the_ridge_regression_of_each_item_on_the_others() -> None:
    rng = np.random.default_rng(0)
    dense = (rng.random((60, 7)) < 0.35).astype(np.float32)
    triples = [(u, str(i), 1.0) for u, i in zip(*np.nonzero(dense), strict=True)]
    data = Interactions.build(triples, [str(i) for i in range(7)])
    x = data.matrix.toarray().astype(np.float64)
    model = CFModel(data, CFParams(kind="ease", ease_l2=0.3))
    weights = model._model.similarity
    lam = 0.3 * float((x * x).sum(axis=0).mean())
    assert np.allclose(np.diag(weights), 0.0)
    for j in range(7):
        others = [c for c in range(7) if c != j]
        a = x[:, others]
        expected = np.linalg.solve(a.T @ a + lam * np.eye(6), a.T @ x[:, j])
        assert np.allclose(weights[others, j], expected, atol=1e-5)
    rows = np.arange(5)
    batch = model.batch_scores(rows)
    user = data.users[3]
    positives = {data.items[c]: 1.0 for c in np.nonzero(x[3])[0]}
    assert np.allclose(model.user_scores(user, positives), batch[3], atol=1e-6)


def test_ease_suggests_the_partner_of_a_visited_item_and_checks_its_penalty() -> None:
    """Visitors come in two topics, {a, b} and {c, d}, with a popular page "c" also seen by
    some of the first; a visitor of "a" should get "b", not the more popular "c"."""
    triples: list[tuple[str, str, float]] = []
    for u in range(12):
        triples += [(f"x{u}", "a", 1.0), (f"x{u}", "b", 1.0)]
        if u < 3:
            triples.append((f"x{u}", "c", 1.0))
    for u in range(30):
        triples += [(f"y{u}", "c", 1.0), (f"y{u}", "d", 1.0)]
    data = Interactions.build(triples, ["a", "b", "c", "d"])
    scores = CFModel(data, CFParams(kind="ease")).user_scores("new", {"a": 1.0})
    assert scores is not None
    index = {item: i for i, item in enumerate(data.items)}
    assert scores[index["b"]] > scores[index["c"]] > scores[index["d"]]
    with pytest.raises(ValueError, match="ease_l2"):
        CFParams(kind="ease", ease_l2=0.0)
