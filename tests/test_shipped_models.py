"""The models a fresh clone serves: the shipped sentiment model answers as ``make run``
configures it, and where its folder is missing the service says so and falls back."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import core.sentiment as sentiment
from core.config import load_settings
from core.sentiment import (
    SHIPPED_MODEL,
    SHIPPED_ONNX,
    EncoderHeadClassifier,
    FineTunedClassifier,
    build_classifier,
)
from tests.conftest import REPO

CLEAR = {
    "Thank you so much, the crew was wonderful and the flight was on time!": "positive",
    "My bag is lost, nobody answers the phone, worst service ever": "negative",
    "What time does the check-in desk open tomorrow?": "neutral",
}


def _configured() -> sentiment._Batched:
    s = load_settings(REPO / "config.toml").sentiment
    return build_classifier(s.encoder, s.head, s.model, 32, 2.0, s.quantize, s.threads,
                            s.runtime)


def test_make_run_serves_the_shipped_sentiment_model(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="core.sentiment"):
        classifier = _configured()
    if not (SHIPPED_MODEL / SHIPPED_ONNX).is_file():  # a checkout without the shipped files
        assert isinstance(classifier, EncoderHeadClassifier)
        assert "shipped model" in caplog.text and "falling back" in caplog.text
        return
    assert isinstance(classifier, FineTunedClassifier)
    assert "fine-tuned model" in caplog.text and "onnx, int8" in caplog.text
    classifier._load()
    assert classifier.onnx_path is not None
    assert classifier.onnx_path.resolve() == SHIPPED_MODEL / SHIPPED_ONNX, "nothing built"
    scores = classifier.classify_many(list(CLEAR))
    assert [s.label for s in scores] == list(CLEAR.values())
    assert scores[1].negative >= 0.75, "a clear complaint reaches the escalation threshold"
    total = sum(p.stat().st_size for p in SHIPPED_MODEL.rglob("*") if p.is_file())
    assert total <= 40 * 2**20, f"shipped sentiment files are {total / 2**20:.1f} MiB"
    assert (SHIPPED_MODEL / "MODEL_CARD.md").is_file()
    # It runs only as shipped: torch weights are not in the folder.
    with pytest.raises(ValueError, match=r'runtime = "onnx"'):
        FineTunedClassifier(SHIPPED_MODEL, runtime="torch")._load()
    with pytest.raises(ValueError, match=r'quantize = "int8"'):
        FineTunedClassifier(SHIPPED_MODEL, runtime="onnx", quantize="none")._load()


def test_a_missing_shipped_model_falls_back_with_a_clear_log_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    gone = tmp_path / "sentiment-minilm"
    monkeypatch.setattr(sentiment, "SHIPPED_MODEL", gone)
    with caplog.at_level(logging.WARNING, logger="core.sentiment"):
        classifier = build_classifier("minilm", "", str(gone), 32, 2.0, "int8", 1, "onnx")
    assert isinstance(classifier, EncoderHeadClassifier)
    assert f"the shipped model {gone} is missing; falling back" in caplog.text
