"""One customer across platforms: an operator links a ticket's web account with the same
person's Telegram account through the operator API (real service on 127.0.0.1, real SQLite),
the history then spans both; unlinking takes it out again. Bad requests are named."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp

from core.messages import Inbound, User
from core.store import MIGRATIONS, SQLiteStore
from tests.conftest import Desk
from tests.test_end_to_end import Customer, operator_headers


async def seed_conversation(
    store: SQLiteStore, platform: str, user_id: str, name: str, key: str, text: str,
    hours_ago: float = 0.0,
) -> int:
    """A customer message from another platform, recorded as its adapter would."""
    stored = await store.record_inbound(Inbound(
        platform=platform, conversation_key=key, user=User(platform, user_id, name),
        platform_message_id=f"{key}-1", text=text,
        sent_at=datetime.now(UTC) - timedelta(hours=hours_ago),
    ))
    assert stored is not None
    return stored.user_id


async def escalated_web_ticket(http: aiohttp.ClientSession, base: str, session: str) -> dict:
    customer = await Customer.connect(http, base, session)
    await customer.say("My refund has not arrived yet.")
    await customer.until("reply")
    await customer.ws.send_json({"type": "command", "id": "h1", "name": "human"})
    await customer.until("message", sender="system")
    await customer.ws.close()
    resp = await http.get(f"{base}/api/operator/tickets", headers=operator_headers())
    [ticket] = (await resp.json())["tickets"]
    return ticket


async def test_link_history_unlink_and_refusals(desk: Desk) -> None:
    base = desk.base
    telegram_user = await seed_conversation(
        desk.store, "telegram", "12345", "Sam T", "tg-chat-12345",
        "Ordered a blue kettle, order 5521", hours_ago=30)
    async with aiohttp.ClientSession() as http:
        ticket = await escalated_web_ticket(http, base, "links-web-session-1")
        tid = ticket["id"]
        history_url = f"{base}/api/operator/tickets/{tid}/history"

        resp = await http.get(history_url, headers=operator_headers())
        before = await resp.json()
        assert [c["platform"] for c in before["conversations"]] == ["web"]
        assert [a["platform"] for a in before["accounts"]] == ["web"]

        resp = await http.post(f"{base}/api/operator/tickets/{tid}/link",
                               json={"platform": "telegram", "platform_user_id": "12345"},
                               headers=operator_headers("Dana"))
        assert resp.status == 200, await resp.text()
        linked = await resp.json()
        assert {(a["platform"], a["platform_user_id"]) for a in linked["accounts"]} == {
            ("web", "links-web-session-1"), ("telegram", "12345")}

        resp = await http.get(history_url, headers=operator_headers())
        history = (await resp.json())["conversations"]
        # Newest first: the web ticket now, the Telegram chat from yesterday.
        assert [(c["platform"], c["current"]) for c in history] == [
            ("web", True), ("telegram", False)]
        assert history[1]["last_text"] == "Ordered a blue kettle, order 5521"
        assert history[1]["platform_user_id"] == "12345"

        # Linking it again is refused; the event log has the link with its operator.
        resp = await http.post(f"{base}/api/operator/tickets/{tid}/link",
                               json={"platform": "telegram", "platform_user_id": "12345"},
                               headers=operator_headers("Dana"))
        assert resp.status == 409 and "already" in (await resp.json())["error"]
        events = await desk.store.query(
            "SELECT type, value, data FROM events WHERE type LIKE 'customer_%'")
        assert [(e["type"], e["value"]) for e in events] == [("customer_linked", "web:Dana")]
        assert json.loads(events[0]["data"])["linked_user_id"] == telegram_user

        resp = await http.post(f"{base}/api/operator/tickets/{tid}/unlink",
                               json={"user_id": telegram_user},
                               headers=operator_headers("Eve"))
        assert resp.status == 200, await resp.text()
        assert [a["platform"] for a in (await resp.json())["accounts"]] == ["web"]
        resp = await http.get(history_url, headers=operator_headers())
        assert [c["platform"] for c in (await resp.json())["conversations"]] == ["web"]
        events = await desk.store.query(
            "SELECT type, value FROM events WHERE type LIKE 'customer_%' ORDER BY id")
        assert [e["type"] for e in events] == ["customer_linked", "customer_unlinked"]
        assert events[1]["value"] == "web:Eve"

        # Refusals name what is wrong.
        async def post(action: str, body: object, headers: dict | None = None):
            resp = await http.post(f"{base}/api/operator/tickets/{tid}/{action}", json=body,
                                   headers=operator_headers() if headers is None else headers)
            return resp.status, (await resp.json())["error"]

        status, error = await post("link", {"platform": "myspace", "platform_user_id": "1"})
        assert status == 400 and "platform must be one of" in error and "myspace" in error
        status, error = await post("link", {"platform": "telegram", "platform_user_id": "999"})
        assert (status, error) == (404, "no telegram user 999 has written to us")
        status, error = await post("link", {"platform": "discord"})
        assert status == 400 and "platform_user_id" in error
        status, error = await post("link", {})
        assert status == 400 and "user_id" in error
        status, error = await post("link", {"user_id": 9999})
        assert (status, error) == (404, "there is no user 9999")
        status, error = await post("unlink", {"user_id": telegram_user})
        assert (status, error) == (404, "telegram user 12345 is not linked to this customer")
        status, error = await post("link", {"platform": "telegram", "platform_user_id": "12345"},
                                   headers={})
        assert (status, error) == (401, "operator token required")
        status, error = await post("link", {"user_id": telegram_user},
                                   headers={"Authorization": "Bearer wrong"})
        assert (status, error) == (401, "operator token required")
        resp = await http.post(f"{base}/api/operator/tickets/{tid}/link", data="user_id=1",
                               headers={**operator_headers(),
                                        "Content-Type": "application/x-www-form-urlencoded"})
        assert resp.status == 415
        resp = await http.post(f"{base}/api/operator/tickets/4242/link",
                               json={"user_id": telegram_user}, headers=operator_headers())
        assert (resp.status, (await resp.json())["error"]) == (404, "there is no ticket 4242")
        resp = await http.get(f"{base}/api/operator/tickets/{tid}/history")
        assert resp.status == 401
        rows = await desk.store.query("SELECT COUNT(*) AS n FROM users WHERE customer_id "
                                      "IS NOT NULL")
        assert rows[0]["n"] == 0


async def test_links_merge_transitively_and_unlink_rekeys(tmp_path: Path) -> None:
    """Four accounts linked in two pairs, then the pairs joined: one customer. Taking out
    the account whose id keys the group leaves the other three together, and a lone
    account's history is only its own."""
    store = SQLiteStore(tmp_path / "links.db")
    await store.open()
    try:
        assert store.schema_version == len(MIGRATIONS)
        ids = [
            await seed_conversation(store, platform, uid, "Sam", f"{platform}-{uid}", text,
                                    hours_ago=hours)
            for platform, uid, text, hours in (
                ("web", "sess-aaaaaaaa", "web hello", 4), ("telegram", "1", "tg hello", 3),
                ("discord", "2", "dc hello", 2), ("telegram", "3", "tg two", 1))
        ]
        a, b, c, d = ids
        assert await store.link_users(a, b) == sorted([a, b])
        assert await store.link_users(d, c) == sorted([c, d])
        assert await store.link_users(b, c) == sorted(ids)
        texts = [r["last_text"] for r in await store.customer_conversations(c)]
        assert texts == ["tg two", "dc hello", "tg hello", "web hello"]

        assert await store.unlink_user(a) == sorted([b, c, d])
        assert [r["last_text"] for r in await store.customer_conversations(a)] == ["web hello"]
        assert {u["id"] for u in await store.linked_users(d)} == {b, c, d}
        assert await store.unlink_user(b) == sorted([c, d])
        assert await store.unlink_user(c) == []
        for uid in ids:
            assert [u["id"] for u in await store.linked_users(uid)] == [uid]
        assert await store.unlink_user(a) == []
    finally:
        await store.close()


async def test_a_database_from_before_links_is_migrated_with_its_users_unlinked(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(MIGRATIONS[0])
    conn.execute("INSERT INTO users (platform, platform_user_id, display_name, created_at) "
                 "VALUES ('telegram', '77', 'Old Timer', '2024-01-01T00:00:00.000+00:00')")
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    store = SQLiteStore(path)
    await store.open()
    try:
        assert store.schema_version == len(MIGRATIONS)
        old = await store.user_by_platform_id("telegram", "77")
        assert old is not None and old["customer_id"] is None
        new = await seed_conversation(store, "web", "sess-bbbbbbbb", "Old Timer", "s-b", "hi")
        assert await store.link_users(new, old["id"]) == [old["id"], new]
        assert [r["platform"] for r in await store.customer_conversations(old["id"])] == ["web"]
    finally:
        await store.close()
