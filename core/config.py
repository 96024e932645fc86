"""Configuration: ``config.toml`` parsed once at start into frozen, validated dataclasses.

Every section is a frozen pydantic dataclass with ``extra="forbid"``, so a typo in a key
is an error, not a silently ignored setting. Secrets are never read from the file: a
section names the environment variable that holds them (``*_env`` keys).
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from psycopg import Error as PsycopgError
from psycopg.conninfo import conninfo_to_dict
from pydantic import (
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

from core.language import LANGUAGES

_STRICT = ConfigDict(extra="forbid", strict=True)
_NO_ECHO = "config_no_echo"
"""Error type whose offending value is not repeated in the message (it may hold a secret)."""
POSTGRES_SCHEMES = ("postgresql", "postgres")


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True, config=_STRICT)
class ServiceSettings:
    data_dir: str = "data"
    log_level: str = "INFO"
    max_message_chars: int = Field(default=4000, gt=0)
    shutdown_grace_s: float = Field(default=20.0, ge=0)
    log_format: Literal["text", "json"] = "text"
    """``json``: one JSON object a line, with the conversation id when there is one."""
    redact_logs: bool = True
    """Emails, phone and card numbers in log lines are replaced by placeholders."""
    replica_id: str = ""
    """This replica's name when several share one PostgreSQL database (empty: the host
    name); it owns the conversations it answers, so two replicas must never share one."""
    lease_ttl_s: float = Field(default=30.0, gt=0)
    """A replica's hold on a conversation lapses this long after its last renewal, and
    another replica takes the conversation over."""
    sweep_interval_s: float = Field(default=1.0, gt=0)
    """How often a replica looks for conversations nobody holds (its own leases are
    renewed every third of ``lease_ttl_s``)."""


@dataclass(frozen=True, config=_STRICT)
class StoreSettings:
    path: str = "data/supportbot.db"
    """The SQLite file, used while ``url`` is empty."""
    busy_timeout_ms: int = Field(default=5000, ge=0)
    url: str = ""
    """``postgresql://user@host:port/db``: one database for several replicas; empty:
    the embedded SQLite file at ``path``."""
    password_env: str = "SUPPORTBOT_DB_PASSWORD"
    """The environment variable holding the database password (never the URL)."""
    pool_min: int = Field(default=1, ge=1)
    pool_max: int = Field(default=4, ge=1)
    """Connections the PostgreSQL pool keeps open, and the most it opens."""

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, url: str) -> str:
        """A password in the file is read by whoever reads the config, so only the
        environment may hold it; the message never repeats the URL, which may hold one."""
        if not url:
            return url
        if urlsplit(url).scheme not in POSTGRES_SCHEMES:
            raise PydanticCustomError(_NO_ECHO, "must be empty (SQLite at store.path) or a "
                                      "postgresql:// (or postgres://) URL")
        try:
            params = conninfo_to_dict(url)
        except PsycopgError:
            raise PydanticCustomError(_NO_ECHO, "not a valid PostgreSQL URL") from None
        if params.get("password"):
            raise PydanticCustomError(
                _NO_ECHO, "holds a password; put it in the environment variable named "
                "by store.password_env instead")
        return url

    @model_validator(mode="after")
    def _pool_bounds(self) -> StoreSettings:
        if self.pool_min > self.pool_max:
            raise ValueError(f"'store.pool_min' ({self.pool_min}) is larger than "
                             f"'store.pool_max' ({self.pool_max})")
        return self


@dataclass(frozen=True, config=_STRICT)
class GeneratorSettings:
    backend: Literal["transformers", "vllm"] = "transformers"
    model: str = "smollm2"
    """``smollm2`` (the embedded GGUF, converted once), ``smollm2-support`` (the same with
    the shipped LoRA adapter in ``core/assets/generator-lora`` merged in once) or a Hugging
    Face model folder."""
    device: str = "cpu"
    threads: int = Field(default=0, ge=0)
    max_new_tokens: int = Field(default=160, gt=0)
    temperature: float = Field(default=0.3, ge=0)
    top_p: float = Field(default=0.9, gt=0, le=1)
    repetition_penalty: float = Field(default=1.15, ge=1)
    no_repeat_ngram_size: int = Field(default=4, ge=0)
    max_concurrent: int = Field(default=1, gt=0)
    timeout_s: float = Field(default=120.0, gt=0)
    fallback_text: str = (
        "Sorry, I can't answer right now. I've asked a person from our team to help you."
    )
    # vLLM backend (OpenAI-compatible server).
    base_url: str = "http://127.0.0.1:8000"
    api_key_env: str = "SUPPORTBOT_VLLM_API_KEY"
    connect_timeout_s: float = Field(default=5.0, gt=0)
    first_token_timeout_s: float = Field(default=30.0, gt=0)
    retries: int = Field(default=3, ge=0)
    start_degraded: bool = False
    tokenizer: str = ""
    """vLLM backend: a local folder with the served model's tokenizer.json for exact
    prompt budgeting; empty uses an estimate."""
    breaker_failures: int = Field(default=5, gt=0)
    breaker_probe_s: float = Field(default=2.0, gt=0)


@dataclass(frozen=True, config=_STRICT)
class PromptSettings:
    system: str = (
        "You are the customer support assistant of an online store. Answer briefly and "
        "politely. If you are not sure, say so and offer to connect the customer with a person."
    )
    greeting: str = (
        "Hi! I'm the support assistant. Ask me anything about your order, returns or account. "
        "Type /human at any time to talk to a person."
    )
    help_text: str = (
        "Write your question in your own words and I'll answer. Commands: /human to talk to "
        "a person, /feedback <text> to tell us how we did."
    )
    attachment_text: str = (
        "I can only read text for now. Please describe it in words, or type /human to reach "
        "a person."
    )
    history_turns: int = Field(default=6, ge=0)
    history_token_budget: int = Field(default=1536, gt=0)
    """Includes the system prompt, which carries up to ~600 tokens of passages."""


@dataclass(frozen=True, config=_STRICT)
class SentimentSettings:
    encoder: str = "minilm"
    """``minilm`` (the embedded all-MiniLM-L6-v2) or a sentence-transformers folder."""
    head: str = ""
    """Path of a linear head (.safetensors); empty means the committed default head."""
    model: str = ""
    """A fine-tuned sequence-classification folder; when set it replaces encoder + head."""
    quantize: Literal["none", "int8"] = "none"
    """``int8``: dynamic int8 linear layers on the CPU (see ``bench/sentiment.py``)."""
    runtime: Literal["torch", "onnx"] = "torch"
    """``onnx``: run ``model`` on ONNX Runtime (with ``quantize`` applied to the ONNX
    graph), from a file built on first start and cached beside the model folder."""
    threads: int = Field(default=1, ge=0)
    """Intra-op threads of the classifier's worker (0: the library's default, one per
    core). 1 leaves the other core to generation; a box that mostly classifies gains from
    more with ``runtime = "onnx"`` (see ``bench/sentiment.py``)."""
    max_batch: int = Field(default=32, gt=0)
    max_wait_ms: float = Field(default=5.0, ge=0)

    @model_validator(mode="after")
    def _onnx_needs_model(self) -> SentimentSettings:
        if self.runtime == "onnx" and not self.model:
            raise ValueError(
                "runtime = \"onnx\" needs a fine-tuned folder in 'sentiment.model' "
                "(the embedded encoder + head runs on torch)"
            )
        return self


@dataclass(frozen=True, config=_STRICT)
class EscalationSettings:
    negative_threshold: float = Field(default=0.75, ge=0, le=1)
    negative_hits: int = Field(default=2, gt=0)
    window: int = Field(default=3, gt=0)
    ewma_alpha: float = Field(default=0.5, gt=0, le=1)
    """Weight of the newest message in the running average of P(negative)."""
    ewma_threshold: float = Field(default=0.8, ge=0, le=1)
    ewma_min_messages: int = Field(default=3, gt=0)
    repeat_similarity: float = Field(default=0.8, gt=0, le=1)
    """Word-overlap (Jaccard) above which a message repeats an earlier one."""
    repeat_limit: int = Field(default=2, gt=0)
    """Escalate when the customer asks the same thing this many times more."""
    human_phrases: list[str] = Field(
        default_factory=lambda: [
            "human", "real person", "a person", "live agent", "an agent", "agent please",
            "operator", "representative", "talk to someone", "speak to someone",
            "speak to a manager", "customer service rep", "somebody real",
        ]
    )
    handoff_text: str = (
        "I'm connecting you with a person from our support team. They will reply here shortly."
    )
    claim_timeout_s: float = Field(default=300.0, gt=0)
    strong_signals: bool = True
    """Escalate at once, even on a first message, on safety words, legal or regulator
    threats, churn threats, abuse and ``very_negative_threshold``; false: only the rules
    above (a run of negative messages, the trend, repeats)."""
    very_negative_threshold: float = Field(default=0.99, ge=0, le=1)
    """P(negative) of one message that is enough on its own. With the embedded head, 0.99
    on labelled TwACS training openers took 14% of complaints, 1% of questions and no praise
    (0.95 took 36% of complaints, so most would skip the apology)."""
    profanity_min_negative: float = Field(default=0.5, ge=0, le=1)
    """P(negative) above which any swear word escalates; below it (or with no score) the
    swearing must come with a complaint, abuse aimed at you, and no praise."""
    profanity_max_positive: float = Field(default=0.5, ge=0, le=1)
    """P(positive) at or above which swearing or a churn phrase never escalates
    ("fucking awesome crew")."""
    company_names: list[str] = Field(default_factory=list)
    """What customers call you ("acme", "acme air"): "acme sucks" is then abuse aimed at you."""
    extra_profanity: list[str] = Field(default_factory=list)
    extra_churn_phrases: list[str] = Field(default_factory=list)
    """E.g. a competitor: "moving to rivalbank"; matched as words, case-insensitive."""
    extra_legal_phrases: list[str] = Field(default_factory=list)
    extra_safety_phrases: list[str] = Field(default_factory=list)


@dataclass(frozen=True, config=_STRICT)
class RecommenderSettings:
    enabled: bool = True
    max_suggestions: int = Field(default=3, ge=0)
    knowledge_dir: str = "knowledge"
    """The help articles, shared by suggestions and grounded answers."""
    model: Literal["als", "bpr", "item-item", "ease"] = "als"
    factors: int = Field(default=64, gt=0)
    iterations: int = Field(default=15, gt=0)
    regularization: float = Field(default=0.013, ge=0)
    """ALS penalty per (user, item) pair of the training data (x 76k pairs = 1,000 on msweb)."""
    alpha: float = Field(default=300.0, gt=0)
    """ALS confidence of a click against an unseen (user, article) pair."""
    train_threads: int = Field(default=1, gt=0)
    cf_weight: float = Field(default=0.3, ge=0)
    content_weight: float = Field(default=0.6, ge=0)
    popularity_weight: float = Field(default=0.1, ge=0)
    exploration: float = Field(default=0.05, ge=0, le=1)
    """Share of suggestion lists with one slot given to a rarely shown article."""
    retrain_every_s: float = Field(default=600.0, gt=0)
    retrain_after_events: int = Field(default=200, gt=0)


@dataclass(frozen=True, config=_STRICT)
class GroundingSettings:
    """Answers grounded in the knowledge base; nothing relevant means a hand-off."""

    enabled: bool = True
    threshold: float = Field(default=0.35, ge=-1, le=1)
    """Cosine similarity a passage needs; below it for every passage the bot says it does
    not know and hands off (reason ``no_answer``). `supportbot eval grounding --sweep`."""
    k: int = Field(default=3, gt=0)
    max_context_chars: int = Field(default=2400, gt=0)
    cite_margin: float = Field(default=0.05, ge=0)
    reload_interval_s: float = Field(default=30.0, ge=0)
    no_answer_text: str = ""
    """Empty means ``core.grounding.NO_ANSWER_TEXT``."""
    # Facts that fill {{...}} placeholders the customer has not given; empty = plain words.
    company_name: str = ""
    website_url: str = ""
    support_phone: str = ""
    support_email: str = ""
    support_hours: str = ""


@dataclass(frozen=True, config=_STRICT)
class AnswersSettings:
    """What the bot may show: conversation acts first, then grounded answers checked
    sentence by sentence against their passages (see ``core/answers.py``)."""

    acts: bool = True
    """Classify each message first: praise, greetings and complaints without a question
    get a fixed courtesy reply, never a generated one or the no-answer hand-off."""
    check: bool = True
    """Check every generated sentence against the passages; unsupported ones are never
    shown (off only to measure what the check changes)."""
    mode: Literal["auto", "generate", "extract"] = "auto"
    """``auto``: generate, checked, within the time budget below, else answer
    extractively; ``generate``: wait for the model (up to ``generator.timeout_s``);
    ``extract``: always quote the help centre."""
    max_sentences: int = Field(default=4, gt=0)
    """A support answer is 1-4 sentences; generation stops after this many."""
    first_text_s: float = Field(default=1.0, gt=0)
    """``auto``: no checked sentence by then, and the help centre's own words answer."""
    reply_s: float = Field(default=10.0, gt=0)
    """``auto``: generation stops here; the sentences that passed stay."""
    quote_at: float = Field(default=0.65, ge=-1, le=2)
    """``auto``: a help-centre quote at least this relevant to the question answers it at
    once, without the model (12 of the 40 written in-scope questions, none of the
    out-of-scope ones reaching a passage): faithful by construction and no generation time.
    Above 1: always ask the model first."""
    extract_sentences: int = Field(default=3, gt=0)
    """Sentences quoted from the best passage in an extractive answer."""
    min_relevance: float = Field(default=0.40, ge=-1, le=1)
    """MiniLM similarity the best passage's quoted sentences need to the question; below,
    the passage is about something else and the question is handed off as unanswered.
    0.40 keeps 39 of the 40 written in-scope questions and 76% of sampled Bitext requests
    answerable, and hands off most airline questions that reach a store article."""
    weak_score: float = Field(default=0.45, ge=-1, le=1)
    weak_relevance: float = Field(default=0.45, ge=-1, le=1)
    """A passage retrieved below ``weak_score`` needs this relevance instead: a weak match
    whose sentences are only loosely about the question is another topic (costs 3% of
    sampled Bitext requests, keeps 39 of 40 written in-scope questions)."""
    names_relevance: float = Field(default=0.50, ge=-1, le=1)
    """Below this relevance, a question whose names (Delta One, CDG) the passage never
    mentions is handed off too: the passage is about something else."""


@dataclass(frozen=True, config=_STRICT)
class LanguageSettings:
    """The customer's language (``core/language.py``): everything the bot understands is
    English, so another language gets the English help centre quoted under a line in that
    language, or a person."""

    detect: bool = True
    """Off: every message is read as English."""
    languages: list[str] = Field(default_factory=lambda: list(LANGUAGES))
    """ISO 639-1 codes the detector chooses among (English is always one); each needs its
    fixed lines in ``core/language.py``."""

    @model_validator(mode="after")
    def _known_languages(self) -> LanguageSettings:
        unknown = sorted(set(self.languages) - set(LANGUAGES))
        if unknown:
            raise ValueError(f"'language.languages' has {', '.join(unknown)}, which has no "
                             f"fixed lines; known: {', '.join(LANGUAGES)}")
        return self


@dataclass(frozen=True, config=_STRICT)
class WebSettings:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    operator_token_env: str = "SUPPORTBOT_OPERATOR_TOKEN"
    max_ws_message_bytes: int = Field(default=256 * 1024, gt=0)


@dataclass(frozen=True, config=_STRICT)
class TelegramSettings:
    enabled: bool = False
    token_env: str = "SUPPORTBOT_TELEGRAM_TOKEN"
    base_url: str = "https://api.telegram.org/bot"
    base_file_url: str = "https://api.telegram.org/file/bot"
    mode: Literal["polling", "webhook"] = "polling"
    drop_pending_updates: bool = False
    webhook_listen: str = "127.0.0.1"
    webhook_port: int = Field(default=8443, ge=0, le=65535)
    webhook_url: str = ""
    webhook_secret_env: str = "SUPPORTBOT_TELEGRAM_WEBHOOK_SECRET"
    operator_chat_id: int = 0
    """The operator group (a forum supergroup: one topic per escalation); 0 disables it."""
    operator_user_ids: list[int] = Field(default_factory=list)
    edit_interval_s: float = Field(default=1.0, gt=0)
    typing_interval_s: float = Field(default=4.0, gt=0)
    flood_messages: int = Field(default=8, gt=0)
    flood_window_s: float = Field(default=10.0, gt=0)
    overall_max_rate: float = Field(default=30.0, ge=0)
    """Bot API requests per second for the whole bot (AIORateLimiter); 0 turns it off."""
    group_max_rate: float = Field(default=20.0, ge=0)
    """Messages per minute into one group, the operator group included; 0 turns it off."""
    max_retries: int = Field(default=5, ge=0)
    """Retries after a 429 (waiting retry_after) and after a 5xx (backing off)."""


@dataclass(frozen=True, config=_STRICT)
class DiscordSettings:
    enabled: bool = False
    token_env: str = "SUPPORTBOT_DISCORD_TOKEN"
    api_base: str = ""
    """REST base (``https://discord.com/api/v10`` when empty); tests point it at a fake."""
    gateway_url: str = ""
    """Gateway WebSocket URL (``wss://gateway.discord.gg/`` when empty)."""
    support_channel_ids: list[int] = Field(default_factory=list)
    operator_channel_id: int = 0
    operator_role_id: int = 0
    use_threads: bool = False
    edit_interval_s: float = Field(default=1.0, gt=0)
    typing_interval_s: float = Field(default=8.0, gt=0)
    """Typing lasts ~10 s in Discord; it is renewed this often while a reply is generated."""
    guild_ready_timeout_s: float = Field(default=2.0, ge=0)
    """How long discord.py waits for further GUILD_CREATEs before ``on_ready``."""
    start_timeout_s: float = Field(default=60.0, gt=0)
    shard_id: int | None = Field(default=None, ge=0)
    """This replica's gateway shard when several replicas share the bot; Discord sends a
    guild's events to shard ``(guild_id >> 22) % shard_count`` only, and DMs to shard 0.
    Unset (with ``shard_count``): one unsharded connection."""
    shard_count: int | None = Field(default=None, gt=0)
    """How many shards (replicas) there are in all; set with ``shard_id`` or not at all."""

    @model_validator(mode="after")
    def _shard_pair(self) -> DiscordSettings:
        """Half a shard pair would identify as a shard Discord never routes to (or fail
        in discord.py), so both are set or neither, and the id is one of the shards."""
        if (self.shard_id is None) != (self.shard_count is None):
            given, missing = (("shard_id", "shard_count") if self.shard_count is None
                              else ("shard_count", "shard_id"))
            raise PydanticCustomError(
                _NO_ECHO, f"'discord.{given}' is set but 'discord.{missing}' is not; set "
                "both (this replica's shard and the number of shards) or neither")
        if self.shard_id is not None and self.shard_count is not None \
                and self.shard_id >= self.shard_count:
            raise PydanticCustomError(
                _NO_ECHO, f"'discord.shard_id' ({self.shard_id}) must be less than "
                f"'discord.shard_count' ({self.shard_count}): shards are numbered from 0")
        return self


@dataclass(frozen=True, config=_STRICT)
class ReportSettings:
    enabled: bool = False
    """Post the sentiment report into every operator channel on a schedule."""
    every_s: float = Field(default=86400.0, gt=0)
    period_s: float = Field(default=86400.0, gt=0)
    """Each report covers this long a period, compared with the one before it."""
    out_dir: str = "data/reports"


@dataclass(frozen=True, config=_STRICT)
class Settings:
    service: ServiceSettings = Field(default_factory=ServiceSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    generator: GeneratorSettings = Field(default_factory=GeneratorSettings)
    prompt: PromptSettings = Field(default_factory=PromptSettings)
    sentiment: SentimentSettings = Field(default_factory=SentimentSettings)
    escalation: EscalationSettings = Field(default_factory=EscalationSettings)
    recommender: RecommenderSettings = Field(default_factory=RecommenderSettings)
    grounding: GroundingSettings = Field(default_factory=GroundingSettings)
    answers: AnswersSettings = Field(default_factory=AnswersSettings)
    language: LanguageSettings = Field(default_factory=LanguageSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    telegram: TelegramSettings = Field(default_factory=TelegramSettings)
    discord: DiscordSettings = Field(default_factory=DiscordSettings)
    report: ReportSettings = Field(default_factory=ReportSettings)

    def secret(self, env_name: str) -> str | None:
        """Secrets come only from the environment."""
        value = os.environ.get(env_name, "")
        return value or None


_ADAPTER = TypeAdapter(Settings)


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "unexpected_keyword_argument":
        return f"unknown key '{key}'"
    if kind == "missing":
        return f"missing required key '{key}'"
    if kind == _NO_ECHO:
        return f"key '{key}': {err['msg']}"
    return f"key '{key}': {err['msg']} (got {err.get('input')!r})"


def parse_settings(data: dict[str, Any], source: str = "<config>") -> Settings:
    """Validate a parsed TOML document; errors name the file and every bad key."""
    try:
        # JSON mode: strict types (no "3" for 3) while accepting tables for sections.
        return _ADAPTER.validate_json(json.dumps(data, default=str))
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"{source}: {problems}") from None


def load_settings(path: str | Path) -> Settings:
    """Read and validate ``config.toml``; relative paths in it stay relative to the cwd."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_settings(data, str(path))
