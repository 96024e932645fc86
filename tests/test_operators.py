"""The operator workflow through the web operator API: claim, draft, relay, hand back,
re-announce when nobody claims, and refusals."""

from __future__ import annotations

import asyncio

import aiohttp

from core.operators import OperatorError
from core.tickets import Operator
from tests.conftest import wait_for
from tests.test_end_to_end import Customer, operator_headers


async def _escalated(http, base, session: str) -> tuple[Customer, dict]:
    customer = await Customer.connect(http, base, session)
    await customer.say("My order never arrived.")
    await customer.until("reply")
    await customer.ws.send_json({"type": "command", "id": "h1", "name": "human"})
    await customer.until("message", sender="system")
    resp = await http.get(f"{base}/api/operator/tickets", headers=operator_headers())
    tickets = [t for t in (await resp.json())["tickets"] if t["state"] in ("open", "claimed")]
    return customer, tickets[-1]


async def test_claim_draft_relay_and_hand_back(web_service) -> None:
    base = f"http://127.0.0.1:{web_service.adapters[0].port}"
    async with aiohttp.ClientSession() as http:
        customer, ticket = await _escalated(http, base, "operators-flow-1")
        assert ticket["reason"] == "customer_requested"
        tid = ticket["id"]

        resp = await http.post(f"{base}/api/operator/tickets/{tid}/claim", json={},
                               headers=operator_headers("Dana"))
        assert (await resp.json())["ticket"]["claimed_by"] == "web:Dana"
        assert "Dana" in (await customer.until("message", sender="system"))["text"]

        # A second operator cannot take or answer a claimed ticket.
        resp = await http.post(f"{base}/api/operator/tickets/{tid}/reply", json={"text": "hi"},
                               headers=operator_headers("Eve"))
        assert resp.status == 409 and "claimed by web:Dana" in (await resp.json())["error"]

        # Agent assist: the bot drafts an answer for the operator.
        resp = await http.get(f"{base}/api/operator/tickets/{tid}/draft",
                              headers=operator_headers("Dana"))
        assert resp.status == 200
        assert (await resp.json())["draft"].strip()

        # The customer writes; the bot stays silent, the operator sees it.
        await customer.say("ok, waiting")
        await wait_for(lambda: _last_text(http, base, tid, "ok, waiting"))

        resp = await http.post(f"{base}/api/operator/tickets/{tid}/reply",
                               json={"text": "Your parcel is on its way."},
                               headers=operator_headers("Dana"))
        assert resp.status == 200
        assert (await customer.until("message", sender="operator"))["text"] == (
            "Your parcel is on its way.")

        resp = await http.post(f"{base}/api/operator/tickets/{tid}/handback", json={},
                               headers=operator_headers("Dana"))
        assert (await resp.json())["ticket"]["state"] == "handed_back"
        assert "assistant" in (await customer.until("message", sender="system"))["text"]
        await customer.say("What are your opening hours?")
        assert (await customer.until("reply"))["sender"] == "bot"

        # Operator answers are stored, attributed, for fine-tuning later.
        rows = await web_service.store.query(
            "SELECT author FROM messages WHERE sender = 'operator'")
        assert [r["author"] for r in rows] == ["web:Dana"]

        # Acting on a closed ticket is refused with a reason.
        resp = await http.post(f"{base}/api/operator/tickets/{tid}/resolve", json={},
                               headers=operator_headers("Dana"))
        assert resp.status == 409 and "handed_back" in (await resp.json())["error"]


async def _last_text(http, base, tid, needle):
    resp = await http.get(f"{base}/api/operator/tickets", headers=operator_headers())
    return any(t["id"] == tid and t["last_customer_text"] == needle
               for t in (await resp.json())["tickets"])


async def test_unclaimed_ticket_is_reannounced(web_service) -> None:
    base = f"http://127.0.0.1:{web_service.adapters[0].port}"
    async with aiohttp.ClientSession() as http:
        customer, _ = await _escalated(http, base, "operators-timeout")
        assert await web_service.pipeline.operators.reannounce_overdue(0.0) >= 1
        notice = await customer.until("message", sender="system")
        assert "Thanks for waiting" in notice["text"]


async def test_unauthorised_operator_refused(web_service) -> None:
    base = f"http://127.0.0.1:{web_service.adapters[0].port}"
    async with aiohttp.ClientSession() as http:
        bad = {"Authorization": "Bearer wrong", "X-Operator-Name": "Mallory"}
        for method, path in (("GET", "/api/operator/tickets"),
                             ("POST", "/api/operator/tickets/1/resolve"),
                             ("GET", "/api/operator/tickets/1/draft")):
            resp = await http.request(method, f"{base}{path}", headers=bad, json={})
            assert resp.status == 401, path
        ws = await http.ws_connect(f"{base}/api/operator/ws")
        await ws.send_json({"token": "wrong"})
        assert (await ws.receive_json(timeout=5))["type"] == "error"


async def test_two_operators_claiming_at_once_one_wins(web_service) -> None:
    """Two operators (two tabs, two platforms or two replicas) claim in the same instant:
    one gets the ticket, the other a refusal that names the winner, and the customer is
    told once who joined."""
    base = f"http://127.0.0.1:{web_service.adapters[0].port}"
    desk = web_service.pipeline.operators
    async with aiohttp.ClientSession() as http:
        for round_ in range(3):
            customer, ticket = await _escalated(http, base, f"operators-claim-race-{round_}")
            ann, bob = Operator("web", "Ann", "Ann"), Operator("telegram", "7", "Bob")
            results = await asyncio.gather(
                desk.claim(ticket["id"], ann), desk.claim(ticket["id"], bob),
                return_exceptions=True)
            won = [r for r in results if not isinstance(r, BaseException)]
            lost = [r for r in results if isinstance(r, OperatorError)]
            assert len(won) == 1 and len(lost) == 1, results
            winner = won[0].claimed_by
            assert str(lost[0]) == f"ticket {ticket['id']} is already claimed by {winner}"
            name = "Ann" if winner == ann.label else "Bob"
            joined = await customer.until("message", sender="system")
            assert joined["text"] == f"{name} from our support team has joined the chat."
            # Both claims have returned, so every notice either sent is stored by now.
            notices = await web_service.store.query(
                "SELECT m.text FROM messages m JOIN tickets t ON t.conversation_id = "
                "m.conversation_id WHERE t.id = ? AND m.sender = 'system' AND m.text LIKE "
                "'%has joined the chat.'", [ticket["id"]])
            assert [n["text"] for n in notices] == [joined["text"]]
