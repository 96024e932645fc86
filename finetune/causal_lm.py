"""Chat examples as token ids, the assistant-only loss, and where a run gets its base
model and device: what training (:mod:`finetune.generator`) and evaluation
(:mod:`finetune.eval_generator`) share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.conversations import DataError, Example

IGNORE = -100


def default_system() -> str:
    from core.config import PromptSettings

    return PromptSettings().system


# --- encoding ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Encoded:
    """Token ids and labels; labels are IGNORE outside trainable assistant text."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def n_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def chat_messages(example: Example, system: str) -> list[dict[str, str]]:
    """The example as chat-template messages, with ``system`` unless it brings its own."""
    messages = [{"role": t.role, "content": t.content} for t in example.turns]
    if system and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _spans(
    text: str, example: Example, messages: list[dict[str, str]], eos: str
) -> list[tuple[int, int]]:
    """Character spans of the trainable assistant turns (and their end-of-turn token)."""
    offset = len(messages) - len(example.turns)  # 1 when the system prompt was added
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        start = text.find(message["content"], cursor)
        if start < 0:
            raise ValueError(
                f"the chat template changes the text of message {i}; cannot mask the loss"
            )
        end = cursor = start + len(message["content"])
        turn = example.turns[i - offset] if i >= offset else None
        if turn is not None and turn.role == "assistant" and turn.train:
            if eos and text.startswith(eos, end):
                end += len(eos)
            spans.append((start, end))
    return spans


def encode(example: Example, tokenizer: Any, *, system: str, max_len: int) -> Encoded | None:
    """Chat-template tokens with the loss on assistant turns; None if nothing trainable fits.

    Too long: the oldest exchanges go first (the bot also drops old history), then the end
    is cut.
    """
    turns = example.turns
    eos = tokenizer.eos_token or ""
    while True:
        current = Example(turns, example.source, example.group, example.id)
        messages = chat_messages(current, system)
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        spans = _spans(text, current, messages, eos)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = enc["input_ids"]
        body = [t for t in turns if t.role != "system"]
        if len(ids) <= max_len or len(body) <= 2:
            break
        head = [t for t in turns if t.role == "system"]
        rest = body[1:]
        while rest and rest[0].role != "user":
            rest = rest[1:]
        if not any(t.role == "assistant" and t.train for t in rest):
            break
        turns = (*head, *rest)
    labels = [
        tok if any(s < span_end and e > span_start for span_start, span_end in spans) else IGNORE
        for tok, (s, e) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    ids, labels = ids[:max_len], labels[:max_len]
    if all(x == IGNORE for x in labels[1:]):
        return None
    return Encoded(tuple(ids), tuple(labels))


def encode_all(
    examples: Sequence[Example], tokenizer: Any, *, system: str, max_len: int
) -> tuple[list[Encoded], int]:
    """Encoded examples and how many were dropped for having no target left after cutting."""
    out: list[Encoded] = []
    dropped = 0
    for example in examples:
        enc = encode(example, tokenizer, system=system, max_len=max_len)
        if enc is None:
            dropped += 1
        else:
            out.append(enc)
    return out, dropped


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors for one micro-batch."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_loss(model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
    """(summed cross-entropy over target tokens, their number).

    The vocabulary projection is applied to target positions only: most positions are
    prompt, and the 49k-wide logits are the largest tensor of a step.
    """
    import torch.nn.functional as F

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    labels = batch["labels"][:, 1:]
    select = labels != IGNORE
    targets = labels[select]
    config = base.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits[:, :-1][select]
    else:
        hidden = base.get_decoder()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).last_hidden_state
        logits = base.get_output_embeddings()(hidden[:, :-1][select])
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss, int(targets.numel())


def mean_loss(
    model: Any, encoded: Sequence[Encoded], *, batch_size: int, device: str, pad_id: int
) -> float:
    """Mean per-token loss on assistant text (the perplexity is its exp)."""
    import torch

    if not encoded:
        return float("nan")
    was_training = model.training
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    total, count = 0.0, 0
    with torch.no_grad(), autocast(device):
        for i in range(0, len(order), batch_size):
            batch = collate([encoded[j] for j in order[i:i + batch_size]], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, n = token_loss(model, batch)
            total += float(loss)
            count += n
    model.train(was_training)
    return total / max(count, 1)


def autocast(device: str) -> Any:
    import contextlib

    import torch

    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device", 0, "cuda was asked for but torch sees no CUDA device")
    return name


def resolve_base(spec: str, data_dir: Path) -> Path:
    """The base model folder: the embedded SmolLM2 (converted once) or a HF folder."""
    from core.generation.model_files import ensure_hf_model

    return ensure_hf_model(spec, data_dir)
