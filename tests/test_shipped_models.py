"""The models a fresh clone serves: the shipped sentiment model and the tuned generator
answer as ``make run`` configures them, and where their files are missing the service says
so and falls back."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

import core.sentiment as sentiment
from core.config import load_settings
from core.generation import model_files
from core.generation.base import ChatMessage, GenerationParams
from core.generation.embedded import TransformersGenerator
from core.generation.model_files import (
    EMBEDDED_LLM,
    SHIPPED_ADAPTER,
    TUNED_LLM,
    ensure_hf_model,
)
from core.sentiment import (
    SHIPPED_MODEL,
    SHIPPED_ONNX,
    EncoderHeadClassifier,
    FineTunedClassifier,
    build_classifier,
)
from tests.conftest import DATA_DIR, REPO

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
    # It runs only as shipped (no torch weights in the folder): asked for torch, the
    # classifier is built on ONNX int8; built by hand for torch, it says what to set.
    asked = build_classifier("minilm", "", str(SHIPPED_MODEL), 32, 2.0)
    assert isinstance(asked, FineTunedClassifier) and asked.runtime == "onnx"
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


async def test_make_run_serves_the_tuned_generator(caplog: pytest.LogCaptureFixture) -> None:
    """``generator.model = "smollm2-support"``: the shipped adapter merged once into the data
    folder, and the merged model answers; without the adapter, the base with a log line."""
    spec = load_settings(REPO / "config.toml").generator.model
    assert spec == TUNED_LLM
    with caplog.at_level(logging.INFO, logger="core.generation.model_files"):
        folder = await asyncio.to_thread(ensure_hf_model, spec, DATA_DIR)
    if not (SHIPPED_ADAPTER / "adapter_model.safetensors").is_file():
        assert "falling back to the untuned" in caplog.text
        assert folder == await asyncio.to_thread(ensure_hf_model, EMBEDDED_LLM, DATA_DIR)
        return
    assert (folder / "adapter.sha256").is_file() and (SHIPPED_ADAPTER / "MODEL_CARD.md").is_file()
    adapter_bytes = sum(p.stat().st_size for p in SHIPPED_ADAPTER.rglob("*") if p.is_file())
    assert adapter_bytes <= 15 * 2**20, f"shipped adapter is {adapter_bytes / 2**20:.1f} MiB"
    generator = TransformersGenerator(folder, device="cpu", threads=1, max_concurrent=1)
    await generator.start()
    try:
        text = ""
        async for piece in generator.stream(
            [ChatMessage("system", "You are a helpful customer support assistant."),
             ChatMessage("user", "How do I track my order?")],
            GenerationParams(max_new_tokens=24, temperature=0.0),
        ):
            text += piece
    finally:
        await generator.close()
    assert len(text.split()) >= 5, text


def test_a_missing_adapter_falls_back_to_the_base_with_a_clear_log_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(model_files, "SHIPPED_ADAPTER", tmp_path / "generator-lora")
    with caplog.at_level(logging.WARNING, logger="core.generation.model_files"):
        folder = ensure_hf_model(TUNED_LLM, DATA_DIR)
    assert folder == ensure_hf_model(EMBEDDED_LLM, DATA_DIR)
    assert f"the shipped adapter {tmp_path / 'generator-lora'} is missing" in caplog.text
