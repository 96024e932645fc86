"""Sentiment of customer messages: negative / neutral / positive with probabilities.

The embedded default is the all-MiniLM-L6-v2 sentence encoder plus a small linear head
committed in ``core/assets`` (reproduced by ``finetune/sentiment_head.py``). A fine-tuned
sequence-classification folder (``finetune/sentiment.py``) replaces both when configured.
Either way, concurrent requests are micro-batched into one forward pass off the loop.
A fine-tuned folder can also run on ONNX Runtime (``sentiment.runtime = "onnx"``): the
ONNX file is exported from the folder on first start and cached beside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from core.batching import MicroBatcher
from core.generation.model_files import LOAD_LOCK, encoder_dir
from core.social_text import normalize
from core.store import Scores
from core.torch_threads import pin_torch_threads

log = logging.getLogger(__name__)

LABELS = ("negative", "neutral", "positive")
DEFAULT_HEAD = Path(__file__).parent / "assets" / "sentiment_head.safetensors"


@runtime_checkable
class Classifier(Protocol):
    async def classify(self, text: str) -> Scores: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def _scores(probs: Sequence[float]) -> Scores:
    best = max(range(3), key=lambda i: probs[i])
    return Scores(LABELS[best], float(probs[0]), float(probs[1]), float(probs[2]))


QUANTIZE_MODES = ("none", "int8")
RUNTIMES = ("torch", "onnx")
ONNX_FORMAT = 3
"""Bump when :func:`build_onnx` changes what it writes: cached files of older formats
are then rebuilt."""
SUB_BATCH = 32
"""Texts per forward pass: sorted by length and cut here, so padding stays short. On one
CPU thread MiniLM gains nothing from larger batches (see ``bench/sentiment.py``)."""


def int8_layers(module: Any) -> set[str]:
    """The linear layers worth int8: all but each block's feed-forward output projection
    (its GELU input has outliers that per-batch activation scaling handles badly) and the
    pooler / classifier (tiny). Chosen on the dev split with the fine-tuned model: 98.9%
    of labels as fp32 at 1.7x less CPU; every layer int8 was 2.3x but kept 95.9%."""
    import torch

    def keep_float(name: str) -> bool:
        ffn_out = name.endswith(".output.dense") and not name.endswith("attention.output.dense")
        return ffn_out or "pooler" in name or "classifier" in name

    return {
        name for name, child in module.named_modules()
        if isinstance(child, torch.nn.Linear) and not keep_float(name)
    }


def quantize_int8(module: Any) -> Any:
    """Dynamic int8 quantisation (per-channel weights, activations scaled per batch) of
    :func:`int8_layers`: on CPU the linear layers are most of MiniLM's time."""
    import warnings

    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    layers = int8_layers(module)
    if not layers:
        raise ValueError(f"{type(module).__name__} has no linear layers to quantise")
    with warnings.catch_warnings():
        # torch.ao.quantization is marked deprecated in favour of torchao but still ships.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(
            module, dict.fromkeys(layers, per_channel_dynamic_qconfig), dtype=torch.qint8,
            inplace=True,
        )


class _Batched:
    """Shared plumbing: a model loaded off-loop and a micro-batcher in front of it."""

    __slots__ = ("_batcher", "_max_batch", "_max_wait_s", "_quantize", "_runtime", "_threads")

    def __init__(
        self, max_batch: int, max_wait_ms: float, quantize: str = "none", threads: int = 1,
        runtime: str = "torch",
    ) -> None:
        if quantize not in QUANTIZE_MODES:
            raise ValueError(
                f"sentiment.quantize must be one of {', '.join(QUANTIZE_MODES)}, not {quantize!r}"
            )
        if runtime not in RUNTIMES:
            raise ValueError(
                f"sentiment.runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}"
            )
        if threads < 0:
            raise ValueError(f"sentiment threads must be >= 0 (0: the library's default), "
                             f"not {threads}")
        self._max_batch = max_batch
        self._max_wait_s = max_wait_ms / 1000
        self._quantize = quantize
        self._runtime = runtime
        self._threads = threads
        self._batcher: MicroBatcher[str, Scores] | None = None

    @property
    def quantize(self) -> str:
        return self._quantize

    @property
    def runtime(self) -> str:
        return self._runtime

    @property
    def threads(self) -> int:
        return self._threads

    def _predict(self, texts: Sequence[str]) -> list[Scores]:
        raise NotImplementedError

    def _load(self) -> None:
        raise NotImplementedError

    def _pin_threads(self) -> None:
        """Runs in the batcher's worker thread: torch keeps the intra-op thread count per
        thread (OpenMP), so the classifier can run on its own count without changing others'.

        On a small busy CPU, two intra-op threads make every op wait at a barrier for a
        descheduled partner: 2-15x slower than one thread in a micro-benchmark on the loaded
        2-core dev box, and no faster in ``bench/sentiment.py`` when a core was free."""
        if self._threads:
            pin_torch_threads(self._threads)

    async def start(self) -> None:
        import asyncio

        await asyncio.to_thread(self._load)
        self._batcher = MicroBatcher(
            self._predict, max_batch=self._max_batch, max_wait_s=self._max_wait_s,
            name="sentiment", initializer=self._pin_threads,
        )
        await self._batcher.run_in_worker(lambda: None)

    async def classify(self, text: str) -> Scores:
        if self._batcher is None:
            raise RuntimeError("classifier not started")
        return await self._batcher.submit(normalize(text))

    def classify_many(self, texts: Sequence[str]) -> list[Scores]:
        """Blocking batch call for offline evaluation."""
        return self._predict([normalize(t) for t in texts])

    async def close(self) -> None:
        if self._batcher is not None:
            await self._batcher.close()


class EncoderHeadClassifier(_Batched):
    """Sentence embedding (mean-pooled, normalised) followed by a linear softmax head."""

    __slots__ = ("_bias", "_encoder", "_encoder_spec", "_head_path", "_weight")

    def __init__(
        self, encoder: str = "minilm", head: str | Path = "", *, max_batch: int = 32,
        max_wait_ms: float = 5.0, quantize: str = "none", threads: int = 1,
    ) -> None:
        super().__init__(max_batch, max_wait_ms, quantize, threads)
        self._encoder_spec = encoder
        self._head_path = Path(head) if head else DEFAULT_HEAD
        self._encoder: Any = None
        self._weight: Any = None
        self._bias: Any = None

    def _load(self) -> None:
        from safetensors.torch import load_file
        from sentence_transformers import SentenceTransformer

        if not self._head_path.is_file():
            raise FileNotFoundError(f"sentiment head {self._head_path} not found")
        tensors = load_file(str(self._head_path))
        self._weight, self._bias = tensors["weight"], tensors["bias"]
        with LOAD_LOCK:
            encoder = SentenceTransformer(str(encoder_dir(self._encoder_spec)), device="cpu")
        self._encoder = quantize_int8(encoder) if self._quantize == "int8" else encoder

    def _predict(self, texts: Sequence[str]) -> list[Scores]:
        import torch

        with torch.inference_mode():
            # encode() sorts by length and pads per sub-batch.
            emb = self._encoder.encode(
                list(texts), batch_size=SUB_BATCH, convert_to_tensor=True,
                normalize_embeddings=True, show_progress_bar=False,
            )
            probs = torch.softmax(emb @ self._weight.T + self._bias, dim=-1).tolist()
        return [_scores(p) for p in probs]


ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def onnx_cache_path(folder: Path, quantize: str) -> Path:
    """Where :func:`build_onnx` puts a folder's ONNX file: beside the folder (the folder
    itself is left as training wrote it), named by a key of everything the file depends
    on, so retraining or upgrading torch / onnxruntime builds a fresh one. The whole
    config.json is in the key, so refitting only the scale or bias (applied outside the
    graph) also rebuilds: a slower start, never a stale file."""
    import onnxruntime
    import torch

    key = hashlib.sha256()
    key.update(f"{ONNX_FORMAT} {quantize} {torch.__version__} {onnxruntime.__version__}".encode())
    key.update((folder / "config.json").read_bytes())
    for weights in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        stat = weights.stat()
        key.update(f"{weights.name} {stat.st_size} {stat.st_mtime_ns}".encode())
    return folder.parent / f"{folder.name}.onnx" / f"{quantize}-{key.hexdigest()[:16]}.onnx"


def build_onnx(folder: Path, out: Path, quantize: str) -> None:
    """Export a fine-tuned BertForSequenceClassification folder to ONNX (dynamic batch and
    sequence axes), fuse it with onnxruntime's BERT optimizer and, for ``int8``, quantise
    it dynamically (int8 per-channel weights, activations scaled per batch).

    More matmuls are int8 here than in :func:`int8_layers` (see :func:`onnx_float_nodes`):
    ORT's int8 kernels are where its speed comes from, and with only the first block's
    feed-forward output in float they keep dev macro-F1 within 0.001 of fp32. The fp32
    export is checked against torch before anything is written, so a wrong graph (inputs
    bound to the wrong names, say) never gets cached.
    """
    import warnings

    import numpy as np
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with LOAD_LOCK:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        # Eager attention: the graph the BERT optimizer knows how to fuse.
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, attn_implementation="eager"
        ).eval()
    config = model.config
    if config.model_type != "bert":
        raise ValueError(f"{folder / 'config.json'}: sentiment.runtime = \"onnx\" supports "
                         f"BERT models, not model_type {config.model_type!r}")
    probe = tokenizer(["ok", "@user my flight was cancelled and nobody will help"],
                      padding=True, return_tensors="pt")
    probe.setdefault("token_type_ids", torch.zeros_like(probe["input_ids"]))
    args = tuple(probe[name] for name in ONNX_INPUTS)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe_file = out.parent / f".writable-{os.getpid()}"
        probe_file.touch()
        probe_file.unlink()
    except OSError as exc:
        raise RuntimeError(
            f"sentiment.runtime = \"onnx\": cannot write the ONNX cache {out.parent} beside "
            f"sentiment.model {folder} ({exc.strerror or exc}); make that folder writable"
        ) from exc
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        exported, fused, final = (Path(tmp) / n for n in ("export.onnx", "fused.onnx", "final"))
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer notes about Python-side shape checks
            # The TorchScript exporter: one self-contained file, no onnxscript needed.
            torch.onnx.export(
                model, args, str(exported), dynamo=False, opset_version=17,
                input_names=list(ONNX_INPUTS), output_names=["logits"],
                dynamic_axes={n: {0: "batch", 1: "sequence"} for n in ONNX_INPUTS}
                | {"logits": {0: "batch"}},
            )
            expected = model(*args).logits.numpy()
        opt = optimizer.optimize_model(
            str(exported), model_type="bert", num_heads=config.num_attention_heads,
            hidden_size=config.hidden_size,
        )
        opt.save_model_to_file(str(fused))
        got = _onnx_session(fused, 1).run(None, {n: a.numpy() for n, a in zip(
            ONNX_INPUTS, args, strict=True)})[0]
        if not np.allclose(got, expected, atol=1e-3):
            raise RuntimeError(
                f"ONNX export of {folder} disagrees with torch (max logit difference "
                f"{float(np.abs(got - expected).max()):.4f}); not caching it"
            )
        if quantize == "int8":
            keep = onnx_float_nodes(onnx.load(str(fused)))
            quantize_dynamic(
                fused, final, weight_type=QuantType.QInt8, per_channel=True,
                nodes_to_exclude=keep,
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
            _check_kept_float(final, keep)
        else:
            os.replace(fused, final)
        os.replace(final, out)  # atomic: a concurrent start sees the whole file or none
    # Older builds go; one written in the last 10 minutes may be another process's (other
    # library versions) that it is about to open.
    recent = time.time() - 600
    for stale in out.parent.glob(f"{quantize}-*.onnx"):
        if stale != out and stale.stat().st_mtime < recent:
            stale.unlink(missing_ok=True)


ONNX_FLOAT_FFN_LAYERS = (0,)
"""Blocks whose feed-forward output projection the ONNX int8 path leaves in float. Chosen
on dev with the shipped model: the first block's (its GELU output has the outliers that
per-batch activation scaling handles worst) recovers dev macro-F1 0.811 → 0.820 (fp32
0.821) for 6% of the speed; keeping every block's, as torch int8 does, cost 30%."""


def onnx_float_nodes(graph_model: Any) -> list[str]:
    """MatMul nodes the ONNX int8 path leaves in float: the pooler, the classifier (tiny)
    and the feed-forward outputs of :data:`ONNX_FLOAT_FFN_LAYERS`."""
    keep = []
    for node in graph_model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        name = node.name
        ffn_out = "/output/dense/" in name and "/attention/output/dense/" not in name
        if ((ffn_out and any(f"/layer.{i}/" in name for i in ONNX_FLOAT_FFN_LAYERS))
                or "/pooler/" in name or "/classifier/" in name):
            keep.append(name)
            if node.op_type == "Gemm":
                # Dynamic quantisation first splits a Gemm into <name>_MatMul + <name>_Add
                # and matches the exclusions against the new names.
                keep.append(f"{name}_MatMul")
    return keep


def _check_kept_float(path: Path, keep: Sequence[str]) -> None:
    """Every node meant to stay float is a float MatMul in the quantised file: a renaming
    inside onnxruntime must not silently change which layers are int8."""
    import onnx

    present = {node.name: node.op_type for node in onnx.load(str(path)).graph.node}
    missing = [name for name in keep if name in present and present[name] != "MatMul"]
    quantised = [name for name in keep if f"{name}_quant" in present]
    if missing or quantised or not any(present.get(name) == "MatMul" for name in keep):
        raise RuntimeError(f"int8 ONNX export of {path}: layers meant to stay float were "
                           f"quantised ({', '.join(quantised or missing) or 'none kept'})")


def _onnx_session(path: Path, threads: int) -> Any:
    """An ORT CPU session with ``threads`` intra-op threads (0: ORT's default, one per
    core), run from the calling thread, with every graph optimisation on. No spinning: on
    a busy CPU a spinning pool thread steals the core its partner needs (see
    :meth:`_Batched._pin_threads`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class FineTunedClassifier(_Batched):
    """A sequence-classification folder written by ``supportbot finetune sentiment``.

    ``logit_scale`` and ``logit_bias`` in its config.json (fitted on the dev split)
    multiply and then shift the logits,
    so the probabilities and labels are the ones its model card reports. With
    ``runtime="onnx"`` the forward pass runs on ONNX Runtime from a file built from the
    folder on first start (:func:`build_onnx`, cached at :func:`onnx_cache_path`).
    """

    __slots__ = ("_logit_bias", "_logit_scale", "_max_length", "_model", "_onnx_inputs",
                 "_onnx_path", "_order", "_path", "_session", "_tokenizer")

    def __init__(
        self, path: str | Path, *, max_batch: int = 32, max_wait_ms: float = 5.0,
        quantize: str = "none", threads: int = 1, runtime: str = "torch",
    ) -> None:
        super().__init__(max_batch, max_wait_ms, quantize, threads, runtime)
        self._path = Path(path)
        self._model: Any = None
        self._session: Any = None
        self._onnx_path: Path | None = None
        self._onnx_inputs: dict[str, Any] = {}
        self._tokenizer: Any = None
        self._order: list[int] = []
        self._logit_bias: Any = None
        self._logit_scale = 1.0
        self._max_length = 128

    @property
    def logit_scale(self) -> float:
        """The dev-fitted temperature correction: logits are multiplied by it first."""
        return self._logit_scale

    @property
    def logit_bias(self) -> tuple[float, ...]:
        """The bias in :data:`LABELS` order (zeros when the folder has none)."""
        if self._logit_bias is None:
            return (0.0,) * len(LABELS)
        return tuple(float(self._logit_bias[i]) for i in self._order)

    @property
    def onnx_path(self) -> Path | None:
        """The ONNX file in use (``runtime="onnx"``, once started), else None."""
        return self._onnx_path

    def _load(self) -> None:
        config_file = self._path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"sentiment model folder {self._path} has no config.json")
        if self._runtime == "onnx":
            self._load_onnx()
        else:
            self._load_torch()

    def _load_torch(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        with LOAD_LOCK:
            self._tokenizer = AutoTokenizer.from_pretrained(self._path)
            model = AutoModelForSequenceClassification.from_pretrained(self._path).eval()
        self._model = quantize_int8(model) if self._quantize == "int8" else model
        self._read_config(model.config)

    def _load_onnx(self) -> None:
        import numpy as np
        from transformers import AutoConfig, AutoTokenizer

        with LOAD_LOCK:
            self._tokenizer = AutoTokenizer.from_pretrained(self._path)
            config = AutoConfig.from_pretrained(self._path)
        self._read_config(config)
        path = onnx_cache_path(self._path, self._quantize)
        if not path.is_file():
            log.info("building %s from %s (once per model)", path, self._path)
            build_onnx(self._path, path, self._quantize)
        self._session = _onnx_session(path, self._threads)
        self._onnx_path = path
        dtypes = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
        self._onnx_inputs = {i.name: dtypes[i.type] for i in self._session.get_inputs()}

    def _read_config(self, config: Any) -> None:
        config_file = self._path / "config.json"
        self._max_length = int(getattr(config, "max_seq_length", 128))
        id2label = {int(k): v.lower() for k, v in config.id2label.items()}
        by_name = {name: idx for idx, name in id2label.items()}
        try:
            self._order = [by_name[label] for label in LABELS]
        except KeyError:
            raise ValueError(
                f"{config_file}: id2label must name {LABELS}, has {json.dumps(id2label)}"
            ) from None
        scale = getattr(config, "logit_scale", 1.0)
        if (isinstance(scale, bool) or not isinstance(scale, int | float)
                or not math.isfinite(scale) or scale <= 0):
            raise ValueError(f"{config_file}: logit_scale must be a positive number, "
                             f"not {scale!r}")
        self._logit_scale = float(scale)
        bias = getattr(config, "logit_bias", None)
        if bias is not None:
            if (not isinstance(bias, list) or len(bias) != len(id2label)
                    or not all(isinstance(b, int | float) for b in bias)):
                raise ValueError(
                    f"{config_file}: logit_bias must be a list of {len(id2label)} numbers "
                    f"(one per id2label entry), not {bias!r}"
                )
            if self._runtime == "onnx":
                import numpy as np

                self._logit_bias = np.asarray(bias, dtype=np.float32)
            else:
                import torch

                self._logit_bias = torch.tensor(bias, dtype=torch.float32)

    def _predict(self, texts: Sequence[str]) -> list[Scores]:
        if self._session is not None:
            return self._predict_onnx(texts)
        import torch

        # Character length orders tweets well enough to keep each sub-batch's padding short.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        probs: list[list[float]] = [[]] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(order), SUB_BATCH):
                idx = order[start : start + SUB_BATCH]
                batch = self._tokenizer(
                    [texts[i] for i in idx], padding=True, truncation=True,
                    max_length=self._max_length, return_tensors="pt",
                )
                logits = self._model(**batch).logits * self._logit_scale
                if self._logit_bias is not None:
                    logits = logits + self._logit_bias
                rows = torch.softmax(logits, dim=-1)[:, self._order].tolist()
                for i, row in zip(idx, rows, strict=True):
                    probs[i] = row
        return [_scores(p) for p in probs]

    def _predict_onnx(self, texts: Sequence[str]) -> list[Scores]:
        """:meth:`_predict` on ONNX Runtime: the same sub-batches, scale, bias and softmax."""
        import numpy as np

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        probs: list[list[float]] = [[]] * len(texts)
        for start in range(0, len(order), SUB_BATCH):
            idx = order[start : start + SUB_BATCH]
            batch = self._tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True,
                max_length=self._max_length, return_tensors="np",
            )
            feed = {}
            for name, dtype in self._onnx_inputs.items():
                value = batch.get(name)
                if value is None:  # a tokenizer without token types: all segment 0
                    value = np.zeros_like(batch["input_ids"])
                feed[name] = value.astype(dtype, copy=False)
            logits = self._session.run(None, feed)[0] * np.float32(self._logit_scale)
            if self._logit_bias is not None:
                logits = logits + self._logit_bias
            logits = logits - logits.max(axis=-1, keepdims=True)
            exp = np.exp(logits, dtype=np.float64)
            rows = (exp / exp.sum(axis=-1, keepdims=True))[:, self._order].tolist()
            for i, row in zip(idx, rows, strict=True):
                probs[i] = row
        return [_scores(p) for p in probs]


def build_classifier(
    encoder: str, head: str, model: str, max_batch: int, max_wait_ms: float,
    quantize: str = "none", threads: int = 1, runtime: str = "torch",
) -> _Batched:
    """The configured classifier: a fine-tuned folder if set, else encoder + head.

    ``quantize`` is ``sentiment.quantize``; ``threads`` the torch (or ONNX Runtime)
    threads of the classifier's own worker thread (0: the library's default); ``runtime``
    is ``sentiment.runtime``, where ``onnx`` needs a fine-tuned folder.
    """
    if model:
        return FineTunedClassifier(model, max_batch=max_batch, max_wait_ms=max_wait_ms,
                                   quantize=quantize, threads=threads, runtime=runtime)
    if runtime not in RUNTIMES:
        raise ValueError(
            f"sentiment.runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}"
        )
    if runtime != "torch":
        raise ValueError(
            f"sentiment.runtime = {runtime!r} needs a fine-tuned folder in sentiment.model; "
            "the embedded encoder + head runs on torch"
        )
    return EncoderHeadClassifier(encoder, head, max_batch=max_batch, max_wait_ms=max_wait_ms,
                                 quantize=quantize, threads=threads)
