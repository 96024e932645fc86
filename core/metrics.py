"""Prometheus metrics for the pipeline, exposed by the web adapter at ``/metrics``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

MESSAGES = Counter(
    "supportbot_messages_total", "Customer events accepted", ["platform", "kind"],
    registry=REGISTRY,
)
DUPLICATES = Counter(
    "supportbot_duplicates_total", "Redelivered events recognised and dropped", ["platform"],
    registry=REGISTRY,
)
REPLIES = Counter(
    "supportbot_replies_total", "Bot replies by outcome", ["outcome"], registry=REGISTRY
)
ESCALATIONS = Counter(
    "supportbot_escalations_total", "Tickets opened", ["reason"], registry=REGISTRY
)
FIRST_TOKEN = Histogram(
    "supportbot_first_token_seconds", "Time to the first generated token",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=REGISTRY,
)
REPLY_LATENCY = Histogram(
    "supportbot_reply_seconds", "Time from processing start to the reply sent",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 60, 120), registry=REGISTRY,
)
QUEUED = Gauge(
    "supportbot_conversations_busy", "Conversations with work queued or running",
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "supportbot_queue_depth", "Customer events queued or being processed", registry=REGISTRY,
)
SENTIMENT = Counter(
    "supportbot_sentiment_total", "Customer messages by sentiment label", ["label"],
    registry=REGISTRY,
)
ACTS = Counter(
    "supportbot_acts_total", "Customer messages by conversation act", ["act"],
    registry=REGISTRY,
)
CLAIMS = Counter(
    "supportbot_claims_total",
    "Sentences of generated answers by check outcome (dropped ones are never shown)",
    ["outcome"], registry=REGISTRY,
)
EXTRACTIVE = Counter(
    "supportbot_extractive_answers_total",
    "Answers quoted from the help centre instead of generated, by why", ["reason"],
    registry=REGISTRY,
)
GENERATOR_ERRORS = Counter(
    "supportbot_generator_errors_total", "Failed generations by kind", ["kind"],
    registry=REGISTRY,
)
BREAKER_STATE = Gauge(
    "supportbot_generator_breaker_state",
    "Generator circuit breaker: 0 closed, 1 half-open, 2 open (-1: the backend has none)",
    registry=REGISTRY,
)
BREAKER_STATE.set(-1)
STORE_ERRORS = Counter(
    "supportbot_store_errors_total", "Database operations that failed, by kind", ["kind"],
    registry=REGISTRY,
)
STORE_RETRIES = Counter(
    "supportbot_store_retries_total", "Database operations retried after a lock",
    registry=REGISTRY,
)
UNDELIVERED = Counter(
    "supportbot_store_fallbacks_total",
    "Customers sent an unrecorded apology because the database failed mid-message",
    registry=REGISTRY,
)
STORE_BACKLOG = Gauge(
    "supportbot_store_backlog",
    "Writes owed to the database for replies already sent, waiting for it to work again",
    registry=REGISTRY,
)
STORE_WRITES_LOST = Counter(
    "supportbot_store_writes_lost_total",
    "Owed database writes given up: one that kept failing, or still owed at shutdown",
    ["reason"], registry=REGISTRY,
)
