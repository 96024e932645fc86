"""The ONNX Runtime form of a fine-tuned sentiment folder (``sentiment.runtime = "onnx"``).

Exported from the folder on first start, fused, optionally quantised to int8, checked, and
cached beside the folder; :class:`core.sentiment.FineTunedClassifier` runs it. Kept apart
from the classifier because building the file is a one-off job with its own dependencies
(``onnx``, onnxruntime's optimizer and quantiser).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.generation.model_files import LOAD_LOCK

ONNX_FORMAT = 3
"""Bump when :func:`build_onnx` changes what it writes: cached files of older formats
are then rebuilt."""

ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


OUTSIDE_GRAPH = ("logit_scale", "logit_bias", "negative_threshold")
"""config.json keys fitted on dev after training and applied outside the exported graph."""


def onnx_cache_path(folder: Path, quantize: str) -> Path:
    """Where :func:`build_onnx` puts a folder's ONNX file: beside the folder (the folder
    itself is left as training wrote it), named by a key of everything the file depends
    on, so retraining or upgrading torch / onnxruntime builds a fresh one. config.json is
    in the key except the dev-fitted corrections (:data:`OUTSIDE_GRAPH`), which the
    classifier applies to the logits after the graph: editing only those in config.json
    reuses the file. Weights are keyed by size and modification time, so a ``finetune``
    refit (which writes the weights again) still rebuilds."""
    import onnxruntime
    import torch

    key = hashlib.sha256()
    key.update(f"{ONNX_FORMAT} {quantize} {torch.__version__} {onnxruntime.__version__}".encode())
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    for name in OUTSIDE_GRAPH:
        config.pop(name, None)
    key.update(json.dumps(config, sort_keys=True).encode())
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
    feed-forward output in float they keep 99% of fp32's labels on the test tweets
    (macro-F1 within 0.004; see the README). The fp32 export is checked against torch
    before anything is written, so a wrong graph (inputs bound to the wrong names, say)
    never gets cached.
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
        got = onnx_session(fused, 1).run(None, {n: a.numpy() for n, a in zip(
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
on dev with the soup of seeds 0-2 (the model shipped then): the first block's (its GELU
output has the outliers that per-batch activation scaling handles worst) recovers dev
macro-F1 0.811 → 0.820 (fp32 0.821) for 6% of the speed; keeping every block's, as torch
int8 does, cost 30%."""


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


def onnx_session(path: Path, threads: int) -> Any:
    """An ORT CPU session with ``threads`` intra-op threads (0: ORT's default, one per
    core), run from the calling thread, with every graph optimisation on. No spinning: on
    a busy CPU a spinning pool thread steals the core its partner needs (see
    :meth:`core.sentiment._Batched._pin_threads`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
