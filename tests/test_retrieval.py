"""Retrieval with the real MiniLM encoder over hand-written fixture articles."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from rank_bm25 import BM25Okapi

from core.grounding import Grounder
from core.knowledge import Article, KnowledgeError, load_knowledge
from core.messages import Citation
from core.retrieval import (
    Lexical,
    MiniLMEncoder,
    QueryCache,
    Retriever,
    citations,
    split_passages,
    tokenize,
)
from core.suggestions import RetrieverContent
from finetune import eval_retrieval

FIXTURES = Path(__file__).parent / "fixtures" / "kb"


class CountingEncoder:
    """The real encoder, recording how many texts it embedded and on which thread."""

    def __init__(self, inner: MiniLMEncoder) -> None:
        self.inner = inner
        self.texts = 0
        self.threads: set[int] = set()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.texts += len(texts)
        self.threads.add(threading.get_ident())
        return self.inner.encode(texts)


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    return MiniLMEncoder()


@pytest.fixture
def kb_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "kb"
    shutil.copytree(FIXTURES, folder)
    return folder


@pytest.fixture(scope="module")
def retriever(minilm: MiniLMEncoder, tmp_path_factory: pytest.TempPathFactory) -> Retriever:
    return Retriever(FIXTURES, tmp_path_factory.mktemp("cache"), encoder=minilm)


def _article(body: str) -> Article:
    return Article("a", "Title", ("t",), "https://help.example.com/a", body, Path("a.md"))


def test_long_article_is_split_at_headings_within_the_word_limits() -> None:
    sections = "\n\n".join(
        f"## Step {n}\n\n" + " ".join(f"word{n}x{i}" for i in range(70)) for n in range(1, 6)
    )
    passages = split_passages(_article("Intro sentence here.\n\n" + sections), 100, 200)
    # Intro + steps 1-2 reach 100 words; steps 3-4 likewise; step 5 is left on its own.
    assert [p.heading for p in passages] == ["", "Step 3", "Step 5"]
    assert all(len(p.text.split()) <= 200 for p in passages)
    assert passages[0].text.startswith("Intro sentence here.\n\n## Step 1\nword1x0")
    assert "## Step 2\nword2x0" in passages[0].text
    assert passages[2].text.startswith("## Step 5\nword5x0")
    assert [p.position for p in passages] == [0, 1, 2]
    assert all(p.url == "https://help.example.com/a" and p.title == "Title" for p in passages)


def test_overlong_paragraph_is_cut_at_sentence_ends() -> None:
    sentence = " ".join(["lorem"] * 29) + " end."
    passages = split_passages(_article(" ".join([sentence] * 12)), 100, 200)
    assert [len(p.text.split()) for p in passages] == [180, 180]


def test_short_article_is_one_passage() -> None:
    assert len(split_passages(_article("Just one short paragraph."))) == 1


def test_tokenize_stems_and_drops_stop_words() -> None:
    assert tokenize("How do I get my Refunds? Refunded!") == ["refund", "refund"]
    assert tokenize("Deliveries and invoices") == ["delivery", "invoic"]


@pytest.mark.parametrize(
    ("question", "article_id"),
    [
        ("I forgot my password and can't log in", "reset-password"),
        ("the shoes I bought are broken, I want my money back", "refunds"),
        ("when will my parcel arrive?", "delivery-times"),
        ("please stop sending me marketing emails", "newsletter"),
        ("what are your support hours", "contact-us"),
    ],
)
def test_search_finds_the_answering_article(
    retriever: Retriever, question: str, article_id: str
) -> None:
    hits = retriever.search(question, k=3)
    assert hits, question
    top = hits[0]
    assert top.article_id == article_id
    article = retriever.knowledge.get(article_id)
    assert article is not None
    assert (top.title, top.url) == (article.title, article.url)
    assert all(line in article.body for line in top.text.splitlines())
    assert all(retriever.threshold <= h.score <= 1.0 for h in hits)
    assert citations(hits)[0] == Citation(id=article_id, title=article.title, url=article.url)
    assert len(citations(hits)) == len({h.article_id for h in hits})


def test_search_returns_passages_not_whole_articles(retriever: Retriever) -> None:
    hits = retriever.search("how long until the card refund shows on my statement", k=1)
    assert hits[0].article_id == "refunds"
    assert hits[0].heading == "How the money comes back" or "statement" in hits[0].text
    refunds = retriever.knowledge.get("refunds")
    assert refunds is not None and len(hits[0].text) < len(refunds.body)


@pytest.mark.parametrize(
    "question",
    [
        "what will the weather be like in Paris tomorrow?",
        "who won the football world cup in 1998",
        "what is a good dose of ibuprofen for a headache",
    ],
)
def test_nothing_relevant_gives_no_hits(retriever: Retriever, question: str) -> None:
    assert retriever.search(question, k=3) == []


def test_recent_turns_give_a_follow_up_its_topic(retriever: Retriever) -> None:
    follow_up = "and how long does that take?"
    with_context = retriever.search(
        follow_up, recent_turns=["My blender arrived broken, I want a refund to my card"], k=1
    )
    assert with_context and with_context[0].article_id == "refunds"
    without = retriever.search(follow_up, k=1)
    assert not without or without[0].article_id != "refunds"


def test_k_limits_hits_and_blank_question_gives_none(retriever: Retriever) -> None:
    assert len(retriever.search("refund", k=2)) <= 2
    assert retriever.search("   ", k=3) == []
    assert retriever.search("refund", k=0) == []


async def test_asearch_runs_the_encoder_off_the_event_loop_thread(
    minilm: MiniLMEncoder, tmp_path: Path
) -> None:
    counting = CountingEncoder(minilm)
    r = await Retriever.open(FIXTURES, tmp_path, encoder=counting)
    counting.threads.clear()
    hits = await r.asearch("I forgot my password", ["hello"], 2)
    assert hits[0].article_id == "reset-password"
    assert counting.threads and threading.get_ident() not in counting.threads


def test_index_is_cached_on_disk_by_knowledge_fingerprint(
    minilm: MiniLMEncoder, kb_dir: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    first = CountingEncoder(minilm)
    Retriever(kb_dir, cache, encoder=first)
    assert first.texts > 0
    assert len(list(cache.glob("passages-*.npy"))) == 1

    second = CountingEncoder(minilm)
    warm = Retriever(kb_dir, cache, encoder=second)
    assert second.texts == 0
    assert warm.search("I forgot my password", k=1)[0].article_id == "reset-password"

    (kb_dir / "newsletter.md").unlink()
    third = CountingEncoder(minilm)
    Retriever(kb_dir, cache, encoder=third)
    assert third.texts > 0
    assert len(list(cache.glob("passages-*.npy"))) == 1


def test_reload_if_changed_picks_up_edited_and_new_articles(
    minilm: MiniLMEncoder, kb_dir: Path, tmp_path: Path
) -> None:
    r = Retriever(kb_dir, tmp_path / "cache", encoder=minilm)
    assert r.reload_if_changed() is False
    question = "can I pay for my order with a gift card"
    assert all(h.article_id != "gift-cards" for h in r.search(question, k=3))
    (kb_dir / "gift-cards.md").write_text(
        '+++\nid = "gift-cards"\ntitle = "Paying with gift cards"\ntags = ["gift card"]\n'
        'url = "https://help.example.com/gift-cards"\n+++\n\n'
        "You can pay for any order with a gift card. Enter the card code at checkout.\n",
        encoding="utf-8",
    )
    assert r.reload_if_changed() is True
    assert r.search(question, k=1)[0].article_id == "gift-cards"
    assert r.reload_if_changed() is False


def test_reload_with_a_broken_article_keeps_the_old_index(
    minilm: MiniLMEncoder, kb_dir: Path, tmp_path: Path
) -> None:
    r = Retriever(kb_dir, tmp_path / "cache", encoder=minilm)
    (kb_dir / "broken.md").write_text("no front matter\n", encoding="utf-8")
    with pytest.raises(KnowledgeError, match=r"broken\.md: no front matter"):
        r.reload_if_changed()
    assert r.search("I forgot my password", k=1)[0].article_id == "reset-password"


def test_empty_knowledge_base_finds_nothing(minilm: MiniLMEncoder, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    r = Retriever(empty, tmp_path / "cache", encoder=minilm)
    assert r.passages == ()
    assert r.search("how do I get a refund", k=3) == []
    assert r.rank_articles(["refund"])["hybrid"] == [[]]


def _eval_args(tmp_path: Path, **overrides: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    eval_retrieval.configure(parser)
    argv = [
        "--data", str(FIXTURES / "requests.csv"),
        "--knowledge", str(FIXTURES),
        "--cache-dir", str(tmp_path / "cache"),
    ]
    for key, value in overrides.items():
        argv += [f"--{key.replace('_', '-')}", value]
    return parser.parse_args(argv)


def test_eval_retrieval_prints_recall_for_each_method(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert eval_retrieval.run(_eval_args(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "Retrieval over 14 requests (5 intents)" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:5]}
    assert set(rows) == {"embeddings", "bm25", "hybrid"}
    for r1, r3 in rows.values():
        assert 0.0 <= float(r1) <= float(r3) <= 1.0
    assert float(rows["hybrid"][1]) >= 0.85
    assert "best: " in out


def test_eval_retrieval_missing_data_names_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.csv"
    assert eval_retrieval.run(_eval_args(tmp_path, data=str(missing))) == 2
    err = capsys.readouterr().err
    assert f"{missing}: data file not found" in err


def test_eval_retrieval_bad_rows_name_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "bad.csv"
    data.write_text("instruction,intent\nhow do I get a refund,get_refund\nhello,smalltalk\n")
    assert eval_retrieval.run(_eval_args(tmp_path, data=str(data))) == 2
    err = capsys.readouterr().err
    assert f"{data}, line 3: intent 'smalltalk' is not in the intent map" in err

    data.write_text("text,label\nhi,get_refund\n")
    assert eval_retrieval.run(_eval_args(tmp_path, data=str(data))) == 2
    assert "expected the columns 'instruction' and 'intent'" in capsys.readouterr().err


def test_eval_retrieval_rejects_unknown_article_in_intent_map(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mapping = tmp_path / "map.toml"
    mapping.write_text('[intents]\nget_refund = ["no-such-article"]\n')
    assert eval_retrieval.run(_eval_args(tmp_path, intent_map=str(mapping))) == 2
    err = capsys.readouterr().err
    assert "intent 'get_refund' names unknown article(s): no-such-article" in err


# -- query embeddings: cached, micro-batched; one owner of the reload schedule ---------------


async def test_a_repeated_question_is_embedded_once_whatever_its_spacing(
    minilm: MiniLMEncoder, tmp_path: Path
) -> None:
    counting = CountingEncoder(minilm)
    r = await Retriever.open(FIXTURES, tmp_path, encoder=counting)
    counting.texts = 0
    first = await r.asearch("I forgot my password", k=2)
    assert counting.texts == 1
    again = await r.asearch("  I forgot   my password ", k=2)
    assert counting.texts == 1  # the cached vector, same hits
    assert [h.article_id for h in again] == [h.article_id for h in first]
    assert r.search("I forgot my password", k=2) == first
    assert counting.texts == 1
    assert np.allclose(await r.aembed("I forgot my password"),
                       minilm.encode(["I forgot my password"])[0], atol=1e-5)


async def test_concurrent_query_encodings_share_one_forward_pass(
    minilm: MiniLMEncoder, tmp_path: Path
) -> None:
    calls: list[int] = []

    class Batches(CountingEncoder):
        def encode(self, texts: Sequence[str]) -> np.ndarray:
            calls.append(len(texts))
            return super().encode(texts)

    r = await Retriever.open(FIXTURES, tmp_path, encoder=Batches(minilm))
    calls.clear()
    default_threads = torch.get_num_threads()
    questions = [f"question number {n} about refunds" for n in range(12)]
    vectors = await asyncio.gather(*(r.aembed(q) for q in questions))
    assert sum(calls) == 12 and len(calls) < 12  # batched, each text once
    # The embedding thread runs on one torch thread; everyone else keeps the default.
    assert torch.get_num_threads() == default_threads
    with ThreadPoolExecutor(1) as fresh:
        assert fresh.submit(torch.get_num_threads).result() == default_threads
    expected = minilm.encode(questions)
    for vector, want in zip(vectors, expected, strict=True):
        assert np.allclose(vector, want, atol=1e-5)


def test_query_cache_keeps_the_most_recent_and_is_safe_across_threads() -> None:
    cache = QueryCache(2)
    for key in ("a", "b", "c"):
        cache.put(key, np.full(3, ord(key), dtype=np.float32))
    assert cache.get("a") is None and cache.get("b") is not None
    cache.put("d", np.zeros(3, dtype=np.float32))  # "b" was used last, so "c" goes
    assert cache.get("c") is None and cache.get("b") is not None and len(cache) == 2
    vector = cache.get("b")
    assert vector is not None and not vector.flags.writeable

    shared = QueryCache(64)
    errors: list[str] = []

    def worker(seed: int) -> None:
        for n in range(2000):
            key = f"k{(seed * 7 + n) % 100}"
            got = shared.get(key)
            if got is None:
                shared.put(key, np.full(4, hash(key) % 1000, dtype=np.float32))
            elif got[0] != hash(key) % 1000:
                errors.append(key)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(shared) == 64


async def test_the_reload_schedule_has_one_owner_whoever_asks(
    minilm: MiniLMEncoder, kb_dir: Path, tmp_path: Path
) -> None:
    looks: list[float] = []

    class Watched(Retriever):
        __slots__ = ()

        def reload_if_changed(self) -> bool:
            looks.append(time.monotonic())
            return super().reload_if_changed()

    r = Watched(kb_dir, tmp_path / "cache", encoder=minilm, reload_interval_s=1.5)
    content = RetrieverContent(r)
    grounder = Grounder(r, "base")  # keeps the retriever's schedule
    grounder.small_talk.prepare(r.embed)
    assert await r.areload_if_due() is False and looks == []  # not due yet
    await asyncio.sleep(1.6)
    (kb_dir / "gift-cards.md").write_text(
        '+++\nid = "gift-cards"\ntitle = "Paying with gift cards"\ntags = ["gift card"]\n'
        'url = "https://help.example.com/gift-cards"\n+++\n\nPay with a gift card code.\n',
        encoding="utf-8",
    )
    assert await content.refresh() is True  # the recommender's loop asked first
    await grounder.ground("can I pay with a gift card")  # the grounder's ask is not due
    assert await content.refresh() is False
    assert len(looks) == 1
    assert "gift-cards" in r.knowledge.ids()
    Grounder(r, "base", reload_interval_s=0)  # the config's 0: never again
    await asyncio.sleep(1.6)
    assert await content.refresh() is False and len(looks) == 1


def test_sparse_bm25_scores_equal_rank_bm25s() -> None:
    docs = [tokenize(f"{p.title} {p.text}") for a in load_knowledge(FIXTURES)
            for p in split_passages(a)]
    okapi, lexical = BM25Okapi(docs), Lexical.build(docs)
    for query in ("refund refund for my order", "newsletter emails", "xyzzy", ""):
        tokens = tokenize(query)
        assert np.allclose(lexical.scores(tokens), okapi.get_scores(tokens), atol=1e-12)
