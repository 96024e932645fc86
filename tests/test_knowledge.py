"""The knowledge base loads valid folders and names the file and reason for broken ones."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest

from core.knowledge import Article, KnowledgeError, fingerprint, load_knowledge

FIXTURES = Path(__file__).parent / "fixtures" / "kb"
SHIPPED = Path(__file__).parent.parent / "knowledge"

VALID = """+++
id = "gift-cards"
title = "Gift cards"
tags = ["gift card", "payment"]
url = "https://help.example.com/gift-cards"
+++

Gift cards can be used for any order and never expire.
"""


@pytest.fixture
def kb_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "kb"
    shutil.copytree(FIXTURES, folder)
    return folder


def test_fixture_folder_loads_toml_and_yaml_front_matter() -> None:
    kb = load_knowledge(FIXTURES)
    assert kb.ids() == ("contact-us", "delivery-times", "newsletter", "reset-password", "refunds")
    password = kb.get("reset-password")
    assert isinstance(password, Article)
    assert (password.title, password.tags, password.url, password.path) == (
        "Resetting your password",
        ("account", "password", "sign in"),
        "https://help.example.com/reset-password",
        FIXTURES / "password.md",
    )
    assert password.body.startswith("Forgot your password?")
    assert password.body.endswith("we send it again.")
    refunds = kb.get("refunds")
    assert refunds is not None
    assert refunds.tags == ("refunds", "returns", "money back")
    assert "## How the money comes back" in refunds.body
    assert kb.get("contact-us") is not None and kb.get("contact-us").url == "/help/contact-us"


def test_notice_file_is_not_an_article() -> None:
    kb = load_knowledge(FIXTURES)
    assert all(a.path.name != "NOTICE.md" for a in kb)
    assert len(kb) == 5


def test_empty_folder_is_an_empty_knowledge_base(tmp_path: Path) -> None:
    kb = load_knowledge(tmp_path)
    assert len(kb) == 0 and kb.get("anything") is None


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(KnowledgeError, match="nowhere: knowledge folder not found"):
        load_knowledge(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (VALID.replace('url = "https://help.example.com/gift-cards"\n', ""),
         "front matter is missing the key 'url'"),
        (VALID.replace('title = "Gift cards"\n', ""), "front matter is missing the key 'title'"),
        (VALID.replace("Gift cards can be used for any order and never expire.\n", "\n  \n"),
         "the article body is empty"),
        ("Gift cards can be used for any order.\n", "no front matter"),
        (VALID.replace('tags = ["gift card", "payment"]', 'tags = ["gift card", payment]'),
         "front matter is not valid TOML"),
        (VALID.replace('tags = ["gift card", "payment"]', 'tags = "gift card"'),
         "'tags' must be a list of strings"),
        (VALID.replace('id = "gift-cards"', 'id = "Gift Cards!"'), "must be lower-case"),
        (VALID.replace("+++\n\nGift", "\nGift"), "never closed"),
        (VALID.replace('url = "https', 'link = "x"\nurl = "https'), "unknown front matter key"),
        ("---\nid: gift-cards\ntitle Gift cards\n---\nBody.\n", "line 3: expected 'key: value'"),
    ],
)
def test_broken_article_names_file_and_reason(kb_dir: Path, text: str, reason: str) -> None:
    broken = kb_dir / "gift-cards.md"
    broken.write_text(text, encoding="utf-8")
    with pytest.raises(KnowledgeError) as info:
        load_knowledge(kb_dir)
    message = str(info.value)
    assert message.startswith(f"{broken}: ")
    assert reason in message


def test_duplicate_id_names_both_files(kb_dir: Path) -> None:
    copy = kb_dir / "zz-newsletter-copy.md"
    copy.write_text((kb_dir / "newsletter.md").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(KnowledgeError) as info:
        load_knowledge(kb_dir)
    assert str(info.value) == (
        f"{copy}: duplicate id 'newsletter' (also used by {kb_dir / 'newsletter.md'})"
    )


def test_non_utf8_file_is_named(kb_dir: Path) -> None:
    bad = kb_dir / "latin1.md"
    bad.write_bytes(VALID.replace("never", "n\xe9ver").encode("latin-1"))
    with pytest.raises(KnowledgeError, match=r"latin1\.md: not UTF-8 text"):
        load_knowledge(kb_dir)


def test_fingerprint_follows_article_content(kb_dir: Path) -> None:
    before = load_knowledge(kb_dir).fingerprint
    assert fingerprint(kb_dir) == before
    (kb_dir / "NOTICE.md").write_text("changed notice\n", encoding="utf-8")
    assert fingerprint(kb_dir) == before
    delivery = kb_dir / "delivery.md"
    delivery.write_text(delivery.read_text().replace("2 pm", "3 pm"), encoding="utf-8")
    changed = fingerprint(kb_dir)
    assert changed != before
    assert load_knowledge(kb_dir).fingerprint == changed
    (kb_dir / "gift-cards.md").write_text(VALID, encoding="utf-8")
    assert fingerprint(kb_dir) not in (before, changed)


def test_shipped_knowledge_base_is_valid_and_covers_every_intent() -> None:
    kb = load_knowledge(SHIPPED)
    assert len(kb) >= 55
    assert all(a.url == f"https://help.example.com/{a.id}" for a in kb)
    rewritten = [a for a in kb if "ABCD guidelines" in a.path.read_text(encoding="utf-8")]
    assert len(rewritten) == 55
    notice = (SHIPPED / "NOTICE.md").read_text(encoding="utf-8")
    assert "Copyright (c) 2021 ASAPP Research" in notice and "MIT License" in notice
    intents = tomllib.loads((SHIPPED / "intent_map.toml").read_text(encoding="utf-8"))["intents"]
    assert len(intents) == 27
    known = set(kb.ids())
    for intent, ids in intents.items():
        assert ids and set(ids) <= known, intent
