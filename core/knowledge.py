"""The knowledge base: help articles as Markdown files with front matter, validated at start.

Every ``*.md`` file in the folder (except notice files such as ``NOTICE.md``) is one article.
Front matter is either TOML between ``+++`` lines or a YAML-like block between ``---`` lines
(``key: value``, lists as ``[a, b]``). A broken file stops the start with a
:class:`KnowledgeError` naming the file and the reason, because a silently skipped article
is a help answer that quietly disappears.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REQUIRED_KEYS = ("id", "title", "tags", "url")
OPTIONAL_KEYS = ("source",)
NOT_ARTICLES = frozenset({"NOTICE.md", "README.md", "LICENSE.md"})
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class KnowledgeError(Exception):
    """An article file that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True, slots=True)
class Article:
    """One help article; ``body`` is the Markdown after the front matter."""

    id: str
    title: str
    tags: tuple[str, ...]
    url: str
    body: str
    path: Path


@dataclass(frozen=True, slots=True)
class KnowledgeBase:
    """All articles of a folder, in file-name order, with a fingerprint of their content."""

    folder: Path
    articles: tuple[Article, ...]
    fingerprint: str

    def get(self, article_id: str) -> Article | None:
        for article in self.articles:
            if article.id == article_id:
                return article
        return None

    def ids(self) -> tuple[str, ...]:
        return tuple(a.id for a in self.articles)

    def __len__(self) -> int:
        return len(self.articles)

    def __iter__(self) -> Iterator[Article]:
        return iter(self.articles)


def article_files(folder: Path) -> list[Path]:
    """The article files of a folder, sorted so the order (and fingerprint) is stable."""
    return sorted(p for p in folder.glob("*.md") if p.is_file() and p.name not in NOT_ARTICLES)


def _digest_file(digest: hashlib._Hash, path: Path, data: bytes) -> None:
    digest.update(path.name.encode("utf-8") + b"\0" + str(len(data)).encode() + b"\0")
    digest.update(data)


def fingerprint(folder: str | Path) -> str:
    """A hash of every article file's name and bytes: it changes when any article changes."""
    digest = hashlib.sha256()
    for path in article_files(Path(folder)):
        _digest_file(digest, path, path.read_bytes())
    return digest.hexdigest()[:32]


def _split_front_matter(text: str, path: Path) -> tuple[str, str, str]:
    """Return (style, front matter, body); style is ``toml`` or ``yaml``."""
    text = text.lstrip("\ufeff")
    lines = text.splitlines(keepends=True)
    if not lines:
        raise KnowledgeError(f"{path}: empty file (no front matter)")
    fence = lines[0].strip()
    if fence not in ("+++", "---"):
        raise KnowledgeError(f"{path}: no front matter (the first line must be '+++' or '---')")
    for i in range(1, len(lines)):
        if lines[i].strip() == fence:
            head = "".join(lines[1:i])
            body = "".join(lines[i + 1 :])
            return ("toml" if fence == "+++" else "yaml"), head, body
    raise KnowledgeError(f"{path}: front matter opened with '{fence}' is never closed")


def _yaml_value(raw: str, path: Path, lineno: int) -> str | list[str]:
    raw = raw.strip()
    if raw.startswith("["):
        if not raw.endswith("]"):
            raise KnowledgeError(f"{path}: front matter line {lineno}: unclosed list")
        items = [item.strip() for item in raw[1:-1].split(",")]
        return [_unquote(item) for item in items if item]
    return _unquote(raw)


def _unquote(raw: str) -> str:
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
        return raw[1:-1]
    return raw


def _parse_yaml_ish(head: str, path: Path) -> dict[str, object]:
    data: dict[str, object] = {}
    offset = 2  # the front matter starts on the file's second line
    for i, line in enumerate(head.splitlines()):
        lineno = i + offset
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition(":")
        key = key.strip()
        if not sep or not key:
            raise KnowledgeError(f"{path}: front matter line {lineno}: expected 'key: value'")
        if key in data:
            raise KnowledgeError(f"{path}: front matter line {lineno}: key '{key}' given twice")
        data[key] = _yaml_value(value, path, lineno)
    return data


def _parse_front_matter(style: str, head: str, path: Path) -> dict[str, object]:
    if style == "yaml":
        return _parse_yaml_ish(head, path)
    try:
        return tomllib.loads(head)
    except tomllib.TOMLDecodeError as exc:
        raise KnowledgeError(f"{path}: front matter is not valid TOML ({exc})") from None


def _text(data: dict[str, object], key: str, path: Path) -> str:
    value = data[key]
    if not isinstance(value, str) or not value.strip():
        raise KnowledgeError(f"{path}: front matter key '{key}' must be a non-empty string")
    return value.strip()


def parse_article(path: Path, data: bytes | None = None) -> Article:
    """Validate one article file (``data``: its bytes when already read)."""
    try:
        text = (path.read_bytes() if data is None else data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KnowledgeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    style, head, body = _split_front_matter(text, path)
    data = _parse_front_matter(style, head, path)
    for key in REQUIRED_KEYS:
        if key not in data:
            raise KnowledgeError(f"{path}: front matter is missing the key '{key}'")
    unknown = sorted(set(data) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise KnowledgeError(f"{path}: unknown front matter key(s): {', '.join(unknown)}")
    article_id = _text(data, "id", path)
    if not _ID_RE.match(article_id):
        raise KnowledgeError(
            f"{path}: id '{article_id}' must be lower-case letters, digits, '-' or '_'"
        )
    tags = data["tags"]
    if not isinstance(tags, list) or not all(isinstance(t, str) and t.strip() for t in tags):
        raise KnowledgeError(f"{path}: front matter key 'tags' must be a list of strings")
    url = _text(data, "url", path)
    if not url.startswith(("https://", "http://", "/")):
        raise KnowledgeError(f"{path}: url '{url}' must start with https://, http:// or /")
    body = body.strip()
    if not body:
        raise KnowledgeError(f"{path}: the article body is empty")
    return Article(
        id=article_id,
        title=_text(data, "title", path),
        tags=tuple(t.strip() for t in tags),
        url=url,
        body=body,
        path=path,
    )


def load_knowledge(folder: str | Path) -> KnowledgeBase:
    """Load and validate every article of ``folder``; an empty folder is an empty base."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KnowledgeError(f"{folder}: knowledge folder not found")
    seen: dict[str, Path] = {}
    articles: list[Article] = []
    digest = hashlib.sha256()
    for path in article_files(folder):
        data = path.read_bytes()
        _digest_file(digest, path, data)
        article = parse_article(path, data)
        if article.id in seen:
            raise KnowledgeError(
                f"{path}: duplicate id '{article.id}' (also used by {seen[article.id]})"
            )
        seen[article.id] = path
        articles.append(article)
    return KnowledgeBase(
        folder=folder, articles=tuple(articles), fingerprint=digest.hexdigest()[:32]
    )
