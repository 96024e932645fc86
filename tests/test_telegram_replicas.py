"""Telegram in webhook mode behind a load balancer, on two replicas sharing one database.

Both replicas register the load balancer's public URL with Telegram and each serves the
webhook on its own port; the balancer may hand any update to either of them. The test
plays Telegram's side of the webhook itself: it POSTs the JSON update with the secret
header to the replica the balancer picked, and delivers it again elsewhere when the
first delivery is in doubt. What must hold, as the customer sees it in the fake Bot API
and as PostgreSQL records it: every distinct update committed once and answered once,
and the messages of one chat answered in the order they were written, even when they
land on different replicas. The replicas are real ``Service`` objects in this process
(answers quoted from the help centre, so they come at once); PostgreSQL is a throwaway
cluster, the Bot API the fake one.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import psycopg
import pytest
from psycopg.rows import dict_row

from bots.service import Service
from tests.conftest import make_settings, wait_for
from tests.fakes.telegram_api import FakeTelegram, TgUser
from tests.fakes.telegram_driver import OPERATOR_GROUP, texts
from tests.postgres_cluster import Cluster

# PTB 22's own RetryAfter.__init__ reads its deprecated int ``retry_after``.
pytestmark = pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")

PUBLIC_URL = "https://support.example.com/telegram/hook"
SECRET = "lb-s3cret_Token"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
# In scope, so quoted from the help centre at once, each under its own article's title
# (what tells the answers apart) wherever it comes in a conversation.
TOPICS = {
    "How long does delivery take?": "about how long delivery takes",
    "What payment methods do you accept?": "about payment methods",
    "How do I leave a review?": "about leaving a review",
    "How do I unsubscribe from the newsletter?": "about our newsletter",
}
QUESTIONS = list(TOPICS)
SWEEP_S = 0.2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Replica:
    name: str
    service: Service
    port: int

    @property
    def hook(self) -> str:
        return f"http://127.0.0.1:{self.port}/telegram/hook"


class TelegramSide:
    """Telegram's end of the webhook: builds updates as the Bot API shapes them and
    POSTs them to a replica. Customer message ids come from a range of their own, apart
    from the ids the fake gives the bot's messages."""

    def __init__(self, fake: FakeTelegram, http: aiohttp.ClientSession) -> None:
        self.fake = fake
        self.http = http
        self._update_ids = itertools.count(900_000)
        self._message_ids: dict[int, Iterator[int]] = {}

    def message(self, person: TgUser, text: str) -> dict[str, Any]:
        ids = self._message_ids.setdefault(person.id, itertools.count(10_000))
        return {"update_id": next(self._update_ids), "message": {
            "message_id": next(ids), "from": person.to_json(),
            "chat": self.fake.chat(person.id).to_json(), "date": int(time.time()), "text": text,
        }}

    async def post(self, replica: Replica, update: dict[str, Any], secret: str = SECRET) -> int:
        async with self.http.post(replica.hook, json=update,
                                  headers={SECRET_HEADER: secret}) as resp:
            return resp.status

    async def deliver(self, update: dict[str, Any], replicas: Sequence[Replica]) -> None:
        """Until a 2xx, as Telegram does: a failed delivery is retried, here on the next
        replica the balancer picks."""
        for attempt in range(20):
            if 200 <= await self.post(replicas[attempt % len(replicas)], update) < 300:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"update {update['update_id']} was never accepted")


@dataclass
class Deployment:
    fake: FakeTelegram
    a: Replica
    b: Replica
    url: str
    telegram: TelegramSide


@pytest.fixture(scope="module")
async def deployment(pg_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
                     ) -> AsyncIterator[Deployment]:
    """Two replicas as an operator deploys them: one database, one bot, one public URL."""
    url = pg_cluster.create_database()
    fake = await FakeTelegram().start()
    fake.group(OPERATOR_GROUP, "Support operators", forum=True)
    replicas: list[Replica] = []
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SUPPORTBOT_TELEGRAM_TOKEN", fake.token)
        env.setenv("SUPPORTBOT_TELEGRAM_WEBHOOK_SECRET", SECRET)
        try:
            for name in ("tg-a", "tg-b"):
                port = _free_port()
                settings = make_settings(
                    tmp_path_factory.mktemp(name),
                    service={"replica_id": name, "sweep_interval_s": SWEEP_S},
                    store={"url": url},
                    answers={"mode": "extract"},
                    telegram={
                        "enabled": True, "base_url": fake.base_url,
                        "base_file_url": fake.base_file_url, "mode": "webhook",
                        "webhook_url": PUBLIC_URL, "webhook_port": port,
                        "edit_interval_s": 0.05, "operator_chat_id": OPERATOR_GROUP,
                    },
                )
                service = Service(settings)
                replicas.append(Replica(name, service, port))
                await service.start()
            async with aiohttp.ClientSession() as http:
                yield Deployment(fake, replicas[0], replicas[1], url, TelegramSide(fake, http))
        finally:
            for replica in reversed(replicas):
                await replica.service.stop()
            await fake.close()


def _chat_rows(url: str, chat_id: int) -> list[dict[str, Any]]:
    """The chat's messages as PostgreSQL holds them, read behind the replicas' backs."""
    with psycopg.connect(url, row_factory=dict_row) as conn:
        return conn.execute(
            "SELECT m.id, m.direction, m.sender, m.status, m.text, m.platform_message_id, "
            "m.reply_to FROM messages m JOIN conversations c ON c.id = m.conversation_id "
            "WHERE c.platform = 'telegram' AND c.conversation_key = %s ORDER BY m.id",
            [str(chat_id)],
        ).fetchall()


async def _answered(d: Deployment, chat_id: int, expected: int) -> None:
    """Until ``expected`` messages of the chat are answered and the customer sees as many
    bot messages."""
    async def done() -> bool:
        rows = await asyncio.to_thread(_chat_rows, d.url, chat_id)
        inbound = [r for r in rows if r["direction"] == "in"]
        finished = len(inbound) == expected and all(r["status"] == "answered" for r in inbound)
        return finished and len(d.fake.bot_messages(chat_id)) >= expected

    await wait_for(done, timeout=30, step=0.1)


async def _settled(d: Deployment, chat_ids: Sequence[int]) -> dict[int, list[dict[str, Any]]]:
    """Each chat's rows, read after long enough for a second answer, were one coming (a
    replica that found the conversation unanswered would have swept it up by now)."""
    await asyncio.sleep(5 * SWEEP_S)
    return {c: await asyncio.to_thread(_chat_rows, d.url, c) for c in chat_ids}


def _check_once_in_order(d: Deployment, chat_id: int, updates: Sequence[dict[str, Any]],
                         rows: Sequence[dict[str, Any]]) -> list[str]:
    """Each update committed once, in the order written, with exactly one answer sent;
    the customer sees those answers, in that order, once each. Returns what they see."""
    inbound = [r for r in rows if r["direction"] == "in"]
    assert [r["platform_message_id"] for r in inbound] == [
        f"{chat_id}:{u['message']['message_id']}" for u in updates]
    assert [r["text"] for r in inbound] == [u["message"]["text"] for u in updates]
    sent = [r for r in rows if r["direction"] == "out" and r["status"] == "sent"]
    assert [r["reply_to"] for r in sent] == [r["id"] for r in inbound], "one answer each, in order"
    seen = [m.text for m in d.fake.bot_messages(chat_id)]
    assert len(seen) == len(inbound), seen
    for shown, answer in zip(seen, sent, strict=True):
        assert shown.startswith(answer["text"].strip()), (shown, answer["text"])
    sends = [c for c in d.fake.calls_to("sendMessage")
             if c.ok and int(c.params["chat_id"]) == chat_id]
    assert len(sends) == len(inbound), "a message sent twice"
    return seen


async def test_both_replicas_serve_the_one_public_webhook(deployment: Deployment) -> None:
    """Either replica may get any update: both registered the balancer's URL with the same
    secret, both refuse a forged update, and a chat is answered whichever one it reaches."""
    d = deployment
    hooks = [c for c in d.fake.calls_to("setWebhook") if c.ok]
    assert [(c.params["url"], c.params["secret_token"]) for c in hooks] == [
        (PUBLIC_URL, SECRET)] * 2
    assert d.fake.webhook_url == PUBLIC_URL
    ann = d.fake.user(2001, "Ann")
    forged = d.telegram.message(ann, "Do you ship to Canada?")
    for replica in (d.a, d.b):
        assert await d.telegram.post(replica, forged, secret="guess") == 403
    first = d.telegram.message(ann, "Do you ship to Canada?")
    second = d.telegram.message(ann, QUESTIONS[0])
    assert await d.telegram.post(d.a, first) == 200
    assert await d.telegram.post(d.b, second) == 200
    await _answered(d, ann.id, 2)
    rows = await _settled(d, [ann.id])
    _check_once_in_order(d, ann.id, [first, second], rows[ann.id])


async def test_an_update_delivered_to_both_replicas_is_answered_once(
        deployment: Deployment) -> None:
    """A retry after a timeout lands on the other replica while the first still holds
    the update, or after it already answered: one commit, one answer either way."""
    d = deployment
    people = [d.fake.user(3000 + i, f"Customer {i}") for i in range(3)]
    updates = {p.id: [d.telegram.message(p, q) for q in QUESTIONS] for p in people}

    async def chat(person: TgUser) -> None:
        for update in updates[person.id]:
            statuses = await asyncio.gather(d.telegram.post(d.a, update),
                                            d.telegram.post(d.b, update))
            assert statuses == [200, 200]

    await asyncio.gather(*(chat(p) for p in people))
    for person in people:
        await _answered(d, person.id, len(QUESTIONS))
    for person in people:
        for update in updates[person.id]:
            assert await d.telegram.post(d.b, update) == 200
            assert await d.telegram.post(d.a, update) == 200
    rows = await _settled(d, [p.id for p in people])
    for person in people:
        _check_once_in_order(d, person.id, updates[person.id], rows[person.id])


async def test_one_chats_messages_on_both_replicas_are_answered_in_order(
        deployment: Deployment) -> None:
    """Telegram sends a chat's updates one after another, but the balancer spreads them:
    the next message reaches one replica while the other is still answering the last."""
    d = deployment
    people = [d.fake.user(4000 + i, f"Shopper {i}") for i in range(len(QUESTIONS))]
    asked = {p.id: QUESTIONS[i:] + QUESTIONS[:i] for i, p in enumerate(people)}
    updates = {p.id: [d.telegram.message(p, q) for q in asked[p.id]] for p in people}

    async def chat(n: int, person: TgUser) -> None:
        for k, update in enumerate(updates[person.id]):
            first, other = (d.a, d.b) if (n + k) % 2 == 0 else (d.b, d.a)
            await d.telegram.deliver(update, [first, other])
            # Its 200 was lost on the way back: Telegram delivers it again, elsewhere.
            await d.telegram.deliver(update, [other])

    await asyncio.gather(*(chat(n, p) for n, p in enumerate(people)))
    for person in people:
        await _answered(d, person.id, len(QUESTIONS))
    rows = await _settled(d, [p.id for p in people])
    for person in people:
        seen = _check_once_in_order(d, person.id, updates[person.id], rows[person.id])
        assert [TOPICS[q] in shown for q, shown in zip(asked[person.id], seen, strict=True)
                ] == [True] * len(QUESTIONS), seen


def _posts(d: Deployment, thread: int) -> list[str]:
    return texts(d.fake, OPERATOR_GROUP, thread)


async def test_the_operator_group_is_one_room_whichever_replica_posts(
        deployment: Deployment) -> None:
    """A ticket gets one topic, whichever replica has news of it; an operator's message
    delivered to both replicas reaches the customer once; each change is posted once."""
    d = deployment
    eve, dana = d.fake.user(5001, "Eve"), d.fake.user(5002, "Dana")
    await d.telegram.deliver(d.telegram.message(eve, "I want to talk to a person please"), [d.a])
    await d.fake.wait_for(lambda: d.fake.topics(OPERATOR_GROUP), 20)
    ((thread, name),) = d.fake.topics(OPERATOR_GROUP).items()
    assert name.startswith("#") and "Eve" in name
    await d.fake.wait_for(lambda: _posts(d, thread), 10)
    assert _posts(d, thread)[0].startswith("Ticket #")

    # Eve writes again through the other replica: her words go to the same topic.
    await d.telegram.deliver(d.telegram.message(eve, "My parcel never arrived"), [d.b])
    await d.fake.wait_for(lambda: "Eve: My parcel never arrived" in _posts(d, thread), 20)

    # Dana answers in the topic; Telegram's retry lands on the other replica as well.
    said = d.fake.send_text(OPERATOR_GROUP, dana, "Hi Eve, I'm Dana. A new parcel is on "
                            "its way.", thread_id=thread, queue=False)
    assert await asyncio.gather(d.telegram.post(d.b, said), d.telegram.post(d.a, said)) == [
        200, 200]
    await d.fake.wait_for(lambda: any("A new parcel is on its way." in t
                                      for t in texts(d.fake, eve.id)), 20)
    await d.fake.wait_for(lambda: "🙋 Claimed by Dana." in _posts(d, thread), 10)

    # She resolves it through one replica; the redelivery goes to the other.
    resolve = d.fake.send_text(OPERATOR_GROUP, dana, "/resolve sent a new parcel",
                               thread_id=thread, queue=False)
    assert await d.telegram.post(d.a, resolve) == 200
    await d.fake.wait_for(lambda: any(t.startswith("✅ Resolved by Dana.")
                                      for t in _posts(d, thread)), 20)
    assert await d.telegram.post(d.b, resolve) == 200
    await asyncio.sleep(1.0)  # time for a second relay or announcement, were one coming

    assert list(d.fake.topics(OPERATOR_GROUP)) == [thread], "a second topic for one ticket"
    assert len([c for c in d.fake.calls_to("createForumTopic") if c.ok]) == 1
    posts = _posts(d, thread)
    assert posts.count("Eve: My parcel never arrived") == 1
    assert posts.count("🙋 Claimed by Dana.") == 1
    assert len([t for t in posts if t.startswith("✅ Resolved by Dana.")]) == 1
    eve_sees = texts(d.fake, eve.id)
    assert len([t for t in eve_sees if "A new parcel is on its way." in t]) == 1, eve_sees
    assert len([t for t in eve_sees if "has joined the chat" in t]) == 1, eve_sees


async def test_a_suggestion_pressed_on_the_other_replica_shows_its_article(
        deployment: Deployment) -> None:
    """The button under one replica's answer, pressed with the balancer sending the press
    to the other replica: the article's title and link still follow."""
    d = deployment
    finn = d.fake.user(6001, "Finn")
    await d.telegram.deliver(d.telegram.message(finn, QUESTIONS[0]), [d.a])
    await _answered(d, finn.id, 1)

    def with_buttons() -> Any:
        return next((m for m in d.fake.bot_messages(finn.id) if m.buttons), None)

    shown = await d.fake.wait_for(with_buttons, 10)
    label, data = shown.buttons[0]
    press = d.fake.press_button(finn.id, finn, shown.message_id, data, queue=False)
    assert await d.telegram.post(d.b, press) == 200
    await d.fake.wait_for(lambda: any(t.startswith("📖 ") for t in texts(d.fake, finn.id)), 10)
    link = next(m for m in d.fake.bot_messages(finn.id) if m.text.startswith("📖 "))
    assert link.text == f"📖 {label.strip()}"
    assert any(e.get("type") == "text_link" and e["url"].startswith("http")
               for e in link.entities), link
