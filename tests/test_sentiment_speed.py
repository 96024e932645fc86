"""The int8 path (``sentiment.quantize``), the ONNX Runtime path (``sentiment.runtime``),
the dev-fitted logit bias, and micro-batching.

Real MiniLM everywhere: the committed head for the embedded path, and a small model
fine-tuned here on the hand-written fixture for the fine-tuned path.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from core.sentiment import (
    LABELS,
    EncoderHeadClassifier,
    FineTunedClassifier,
    _Batched,
    build_classifier,
)
from core.sentiment_onnx import onnx_cache_path

FIXTURE = Path(__file__).parent / "fixtures" / "tweets_small.csv"

CLEAR_TEXTS = {
    "@AirCo my bag is LOST and your staff was rude. worst airline ever!!! 😡": "negative",
    "@AirCo cancelled again, 5 hours at the gate and nobody tells us anything": "negative",
    "I want my refund NOW, this is a disgrace": "negative",
    "@AirCo thank you so much, wonderful crew and a great flight ❤️": "positive",
    "love the new seats, best flight I've had in years! thanks": "positive",
    "Thanks for the quick help, you guys are awesome 😊": "positive",
}
"""Messages any sentiment model should get right; the head labels them this way."""


WIDE_MARGIN = 0.3
"""fp32's lead of its label over the runner-up at which another runtime must agree on it. A
tiny fixture model leaves some texts near a boundary, where int8's per-batch activation
scaling moves a probability by up to ~0.15 and the label is a coin toss between runtimes and
CPUs, not a test of quantisation."""
MEAN_TOLERANCE = 0.05
"""Mean over the texts of the largest probability change: a healthy int8 model stays well
under it (about 0.02 here); a badly quantised classifier layer does not."""


def comparison_texts() -> list[str]:
    """The clear texts and every fixture tweet: enough texts that a mean means something."""
    from finetune.sentiment_data import load

    return list(CLEAR_TEXTS) + [e.text for e in load(FIXTURE).examples]


def assert_same_decisions(reference: list, other: list, *, min_wide: int = 5) -> None:
    """``other`` is the same model in another runtime: probabilities close on average, and
    the same label wherever ``reference`` decides by a wide margin (at least ``min_wide``
    texts, so the label check always has something to check)."""
    shifts, wide = [], 0
    for x, y in zip(reference, other, strict=True):
        px, py = (x.negative, x.neutral, x.positive), (y.negative, y.neutral, y.positive)
        shifts.append(max(abs(a - b) for a, b in zip(px, py, strict=True)))
        top, second = sorted(px, reverse=True)[:2]
        if top - second >= WIDE_MARGIN:
            wide += 1
            assert y.label == x.label, (x, y)
    assert wide >= min_wide, f"only {wide} texts decided by a wide margin"
    mean = sum(shifts) / len(shifts)
    assert mean < MEAN_TOLERANCE, f"probabilities moved by {mean:.3f} on average"


@pytest.fixture(scope="module")
async def head_pair() -> AsyncIterator[tuple[_Batched, _Batched]]:
    fp32 = build_classifier("minilm", "", "", 32, 2.0)
    int8 = build_classifier("minilm", "", "", 32, 2.0, quantize="int8")
    await asyncio.gather(fp32.start(), int8.start())
    yield fp32, int8
    await fp32.close()
    await int8.close()


@pytest.fixture(scope="module")
def tuned_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fine-tuned folder made by the real training code on the fixture tweets."""
    from finetune.sentiment import TrainConfig, finetune
    from finetune.sentiment_data import load

    data = load(FIXTURE)
    out = tmp_path_factory.mktemp("tuned") / "model"
    cfg = TrainConfig(epochs=6, batch_size=16, lr=2e-4, evals_per_epoch=1, patience=10,
                      threads=0, seed=1)
    finetune(data.split("train"), data.split("dev"), data.split("test"), out, cfg,
             log=lambda _line: None)
    return out


async def test_int8_head_labels_match_fp32(head_pair: tuple[_Batched, _Batched]) -> None:
    fp32, int8 = head_pair
    assert isinstance(int8, EncoderHeadClassifier) and int8.quantize == "int8"
    texts = list(CLEAR_TEXTS)
    a = await asyncio.gather(*(fp32.classify(t) for t in texts))
    b = await asyncio.gather(*(int8.classify(t) for t in texts))
    assert [s.label for s in a] == list(CLEAR_TEXTS.values())
    assert_same_decisions(a, b, min_wide=len(texts))
    for x, y in zip(a, b, strict=True):
        assert abs(x.negative - y.negative) < 0.1
    for x, y in zip(a, b, strict=True):
        # Quantised, not the same float model under another name.
        assert (x.negative, x.neutral, x.positive) != (y.negative, y.neutral, y.positive)


async def test_int8_finetuned_labels_match_fp32(tuned_folder: Path) -> None:
    fp32 = build_classifier("minilm", "", str(tuned_folder), 32, 2.0)
    int8 = build_classifier("minilm", "", str(tuned_folder), 32, 2.0, quantize="int8")
    await asyncio.gather(fp32.start(), int8.start())
    try:
        assert isinstance(int8, FineTunedClassifier)
        texts = comparison_texts()
        a = await asyncio.gather(*(fp32.classify(t) for t in texts))
        b = await asyncio.gather(*(int8.classify(t) for t in texts))
        # The fixture model has learnt the obvious cases, so the comparison means something.
        clear = zip(a[:len(CLEAR_TEXTS)], CLEAR_TEXTS.values(), strict=True)
        assert sum(s.label == want for s, want in clear) >= 5
        assert_same_decisions(a, b)
        diffs = [abs(x.negative - y.negative) for x, y in zip(a, b, strict=True)]
        assert max(diffs) > 0  # quantised, not the float model again
    finally:
        await fp32.close()
        await int8.close()


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("quantize", ["none", "int8"])
async def test_onnx_finetuned_labels_match_torch(tuned_folder: Path, quantize: str) -> None:
    """The ONNX file is built from the folder on first start, cached beside it (the folder
    is left alone), reused on the next start, and gives torch fp32's labels."""
    before = _names(tuned_folder)
    torch_fp32 = build_classifier("minilm", "", str(tuned_folder), 32, 2.0)
    ort = build_classifier("minilm", "", str(tuned_folder), 32, 2.0, quantize=quantize,
                           runtime="onnx")
    await asyncio.gather(torch_fp32.start(), ort.start())
    try:
        assert isinstance(ort, FineTunedClassifier) and ort.runtime == "onnx"
        path = ort.onnx_path
        assert path is not None and path.is_file()
        assert path == onnx_cache_path(tuned_folder, quantize)
        assert path.parent == tuned_folder.parent / f"{tuned_folder.name}.onnx"
        assert _names(tuned_folder) == before
        texts = comparison_texts()
        a = await asyncio.gather(*(torch_fp32.classify(t) for t in texts))
        b = await asyncio.gather(*(ort.classify(t) for t in texts))
        clear = zip(a[:len(CLEAR_TEXTS)], CLEAR_TEXTS.values(), strict=True)
        assert sum(s.label == want for s, want in clear) >= 5
        diffs = [abs(x.negative - y.negative) for x, y in zip(a, b, strict=True)]
        if quantize == "none":
            assert max(diffs) < 1e-4  # the same float model, logit bias included
            assert [s.label for s in b] == [s.label for s in a]
        else:
            assert_same_decisions(a, b)
            assert max(diffs) > 0
            import onnx

            ops = {n.name: n.op_type for n in onnx.load(str(path)).graph.node}
            int8 = [name for name, op in ops.items() if op == "MatMulInteger"]
            assert int8 and not [n for n in int8 if "pooler" in n or "classifier" in n]
            assert not [n for n in int8 if "/layer.0/output/dense/" in n]
            assert any("/layer.1/output/dense/" in n for n in int8)
    finally:
        await torch_fp32.close()
        await ort.close()
    mtime = path.stat().st_mtime_ns
    again = FineTunedClassifier(tuned_folder, quantize=quantize, runtime="onnx")
    again._load()
    assert again.onnx_path == path and path.stat().st_mtime_ns == mtime
    assert_same_decisions(a, again.classify_many(texts))


def test_onnx_cache_follows_the_folder(tuned_folder: Path, tmp_path: Path) -> None:
    """The same folder gets a new file when what the graph is built from (its config or
    its weights) changes, so a retraining is never served from a stale export; refitting
    only the dev corrections, applied after the graph, keeps the file."""
    copy = _with_bias(tuned_folder, tmp_path / "copy", [0.0, 0.0, 0.0])
    first = onnx_cache_path(copy, "int8")
    assert first == onnx_cache_path(copy, "int8")
    assert first.name.startswith("int8-") and onnx_cache_path(copy, "none") != first
    config = json.loads((copy / "config.json").read_text())
    config.update(logit_bias=[0.0, 0.0, 0.1], logit_scale=2.5, negative_threshold=0.4)
    (copy / "config.json").write_text(json.dumps(config, indent=1))
    assert onnx_cache_path(copy, "int8") == first
    config["hidden_dropout_prob"] = 0.2
    (copy / "config.json").write_text(json.dumps(config))
    refit = onnx_cache_path(copy, "int8")
    assert refit != first
    weights = copy / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert onnx_cache_path(copy, "int8") not in (first, refit)


def test_unknown_runtime_names_the_setting() -> None:
    with pytest.raises(ValueError, match=r"^sentiment\.runtime must be one of torch, onnx, "
                                         r"not 'tensorrt'$"):
        build_classifier("minilm", "", "some/folder", 32, 5.0, runtime="tensorrt")
    with pytest.raises(ValueError, match=r"^sentiment\.runtime must be one of"):
        build_classifier("minilm", "", "", 32, 5.0, runtime="tensorrt")
    with pytest.raises(ValueError, match=r"needs a fine-tuned folder in sentiment\.model"):
        build_classifier("minilm", "", "", 32, 5.0, runtime="onnx")


def _with_bias(src: Path, dst: Path, bias: object) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["logit_bias"] = bias
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_training_saves_a_dev_fitted_bias(tuned_folder: Path) -> None:
    config = json.loads((tuned_folder / "config.json").read_text())
    bias = config["logit_bias"]
    assert len(bias) == 3 and bias[0] == 0.0 and all(-2 <= b <= 2 for b in bias)
    assert "test (logit bias, used by the service)" in (tuned_folder / "README.md").read_text()


def test_logit_bias_is_loaded_and_applied(tuned_folder: Path, tmp_path: Path) -> None:
    plain = _with_bias(tuned_folder, tmp_path / "plain", None)
    shifted = _with_bias(tuned_folder, tmp_path / "shifted", [0.0, 0.0, 3.0])
    texts = list(CLEAR_TEXTS)
    a, b = FineTunedClassifier(plain), FineTunedClassifier(shifted)
    a._load()
    b._load()
    assert a.logit_bias == (0.0, 0.0, 0.0) and b.logit_bias == (0.0, 0.0, 3.0)
    pa = np.array([[s.negative, s.neutral, s.positive] for s in a.classify_many(texts)])
    sb = b.classify_many(texts)
    pb = np.array([[s.negative, s.neutral, s.positive] for s in sb])
    expected = pa * np.exp([0.0, 0.0, 3.0])
    expected /= expected.sum(axis=1, keepdims=True)
    assert np.allclose(pb, expected, atol=1e-4)
    assert [s.label for s in sb] == [LABELS[int(i)] for i in pb.argmax(axis=1)]
    assert sum(s.label == "positive" for s in sb) > sum(
        s.label == "positive" for s in a.classify_many(texts)
    )


def _with_scale(src: Path, dst: Path, scale: object) -> Path:
    _with_bias(src, dst, None)
    config = json.loads((dst / "config.json").read_text())
    config["logit_scale"] = scale
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_logit_scale_sharpens_the_probabilities_not_the_labels(
    tuned_folder: Path, tmp_path: Path, runtime: str,
) -> None:
    """A weight-averaged model needs its logits scaled back up, or P(negative) never
    reaches the escalation threshold; both runtimes apply the scale the same way."""
    one = _with_scale(tuned_folder, tmp_path / "one", 1.0)
    sharp = _with_scale(tuned_folder, tmp_path / "sharp", 2.5)
    a = FineTunedClassifier(one, runtime=runtime)
    b = FineTunedClassifier(sharp, runtime=runtime)
    a._load()
    b._load()
    assert (a.logit_scale, b.logit_scale) == (1.0, 2.5)
    texts = list(CLEAR_TEXTS)
    sa, sb = a.classify_many(texts), b.classify_many(texts)
    pa = np.array([[s.negative, s.neutral, s.positive] for s in sa])
    pb = np.array([[s.negative, s.neutral, s.positive] for s in sb])
    expected = pa ** 2.5
    expected /= expected.sum(axis=1, keepdims=True)
    assert np.allclose(pb, expected, atol=1e-3)
    assert [s.label for s in sb] == [s.label for s in sa]
    assert pb.max(axis=1).mean() > pa.max(axis=1).mean()


@pytest.mark.parametrize("scale", [-1, 0, float("inf"), "2"])
def test_bad_logit_scale_names_file_and_key(
    tuned_folder: Path, tmp_path: Path, scale: object,
) -> None:
    bad = _with_scale(tuned_folder, tmp_path / "bad", scale)
    with pytest.raises(ValueError, match=rf"^{bad / 'config.json'}: logit_scale must be a "):
        FineTunedClassifier(bad)._load()


def test_bad_logit_bias_names_file_and_key(tuned_folder: Path, tmp_path: Path) -> None:
    bad = _with_bias(tuned_folder, tmp_path / "bad", [0.0, "high"])
    with pytest.raises(ValueError, match=rf"^{bad / 'config.json'}: logit_bias must be a list"):
        FineTunedClassifier(bad)._load()


def test_unknown_quantize_mode_names_the_setting() -> None:
    with pytest.raises(ValueError, match=r"^sentiment\.quantize must be one of none, int8, "
                                         r"not 'int4'$"):
        build_classifier("minilm", "", "", 32, 5.0, quantize="int4")


async def test_batched_results_follow_their_messages(tuned_folder: Path) -> None:
    """Sub-batches are sorted by length; every caller must still get its own text's scores."""
    clf = FineTunedClassifier(tuned_folder, max_batch=64, max_wait_ms=20)
    await clf.start()
    try:
        texts = [t + " " + "really " * (i % 9) for i, t in enumerate(list(CLEAR_TEXTS) * 7)]
        together = await asyncio.gather(*(clf.classify(t) for t in texts))
        alone = [clf.classify_many([t])[0] for t in texts]
        for x, y in zip(together, alone, strict=True):
            assert x.label == y.label
            assert abs(x.negative - y.negative) < 1e-4
    finally:
        await clf.close()


async def test_worker_runs_on_one_thread_without_changing_the_process() -> None:
    def fresh_thread_count() -> int:
        with ThreadPoolExecutor(1) as other:
            return other.submit(torch.get_num_threads).result()

    # The process default as a new thread sees it, read before this classifier starts:
    # comparing with the main thread afterwards would pass even if pinning leaked into it.
    torch.set_num_threads(2)
    default = fresh_thread_count()
    clf = build_classifier("minilm", "", "", 32, 2.0)
    await clf.start()
    try:
        assert clf._batcher is not None
        assert await clf._batcher.run_in_worker(torch.get_num_threads) == 1
        assert fresh_thread_count() == default == 2
    finally:
        await clf.close()


def test_the_service_runs_the_configured_runtime(tmp_path: Path) -> None:
    """``[sentiment] runtime`` reaches the service's classifier (it was read but unused)."""
    from bots.service import Service
    from tests.conftest import make_settings

    service = Service(make_settings(
        tmp_path, sentiment={"model": str(tmp_path / "tuned"), "runtime": "onnx",
                             "quantize": "int8", "threads": 2}))
    assert isinstance(service.classifier, FineTunedClassifier)
    assert (service.classifier.runtime, service.classifier.quantize) == ("onnx", "int8")
    assert service.classifier.threads == 2
