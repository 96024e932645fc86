"""Compare reply generators on held-out conversations: loss, overlap, meaning, degeneration.

For each model (the base first, then every ``--model``) in one run: the held-out loss and
perplexity on the reference replies, then greedy replies to the same prompts scored by
ROUGE-L (word LCS F1), chrF (sacrebleu), mean MiniLM cosine similarity to the reference,
mean length in words, the share with a ``{{Placeholder}}``, the share of degenerate replies
(one word 4-gram three or more times: a loop) and seconds per reply; plus side-by-side
examples. ``--model`` takes a merged folder, an adapter folder, or a fine-tune output
folder (its ``merged/`` is used).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from finetune.causal_lm import (
    chat_messages,
    default_system,
    encode_all,
    mean_loss,
    resolve_base,
    resolve_device,
)
from finetune.conversations import DataError, Example, load, split
from finetune.tool import run_module

_WORD = re.compile(r"\{\{[^{}]*\}\}|\w+(?:'\w+)?")
_PLACEHOLDER = re.compile(r"\{\{[^{}]+\}\}")


# --- measures ------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """Lower-cased words; a ``{{Placeholder}}`` counts as one word."""
    return _WORD.findall(text.lower())


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1 over words (longest common subsequence), in [0, 1]."""
    h, r = words(hypothesis), words(reference)
    if not h or not r:
        return 0.0
    previous = [0] * (len(r) + 1)
    for hw in h:
        current = [0]
        for j, rw in enumerate(r, start=1):
            current.append(previous[j - 1] + 1 if hw == rw else max(previous[j], current[-1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(h), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def degenerate(text: str, n: int = 4, repeats: int = 3) -> bool:
    """True when one word n-gram comes back ``repeats`` times: the reply loops."""
    w = words(text)
    counts = Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    return bool(counts) and max(counts.values()) >= repeats


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu's default character 6-grams, beta 2), 0..100."""
    from sacrebleu.metrics import CHRF

    return float(CHRF().corpus_score(list(hypotheses), [list(references)]).score)


def prompt_and_reference(example: Example) -> tuple[Example, str]:
    """The conversation up to its last trainable assistant turn, and that turn's text."""
    last = max(i for i, t in enumerate(example.turns) if t.role == "assistant" and t.train)
    prompt = Example(example.turns[:last], example.source, example.group, example.id)
    return prompt, example.turns[last].content


# --- models --------------------------------------------------------------------------------


def model_folder(spec: str, data_dir: Path) -> Path:
    """A loadable folder for ``spec``: the embedded model, a HF/adapter folder, or a
    fine-tune output folder (its ``merged/``)."""
    path = Path(spec)
    if spec != "smollm2" and not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            return path
        if (path / "merged" / "config.json").is_file():
            return path / "merged"
    return resolve_base(spec, data_dir)


def load_model(folder: Path, device: str) -> tuple[Any, Any]:
    """(model in float32 for eval, tokenizer); an adapter folder is merged into its base."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        from peft import PeftModel

        base = Path(json.loads(adapter.read_text())["base_model_name_or_path"])
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, folder).merge_and_unload()
        tokenizer_dir = folder if (folder / "tokenizer_config.json").is_file() else base
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer_dir = folder
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model.to(device).eval()
    return model, tokenizer


def generate(
    model: Any, tokenizer: Any, prompts: Sequence[Example], *, system: str, device: str,
    batch_size: int, max_new_tokens: int, max_prompt_tokens: int,
    repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
) -> list[str]:
    """Greedy replies, batched by prompt length (left padding), in the input order."""
    import torch

    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    texts = [
        tokenizer.apply_chat_template(chat_messages(p, system), tokenize=False,
                                      add_generation_prompt=True)
        for p in prompts
    ]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    replies: list[str] = [""] * len(texts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                        truncation=True, max_length=max_prompt_tokens,
                        add_special_tokens=False).to(device)
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False,
                repetition_penalty=repetition_penalty,
                no_repeat_ngram_size=no_repeat_ngram_size,
                pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
            )
        width = enc["input_ids"].shape[1]
        for row, i in enumerate(idx):
            replies[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    return replies


# --- report --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelScores:
    label: str
    path: str
    loss: float
    rouge_l: float
    chrf: float
    similarity: float
    mean_words: float
    placeholder_rate: float
    degenerate_rate: float
    seconds_per_reply: float
    replies: tuple[str, ...]

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if not math.isnan(self.loss) else math.nan


@dataclass(frozen=True, slots=True)
class Report:
    models: tuple[ModelScores, ...]
    prompts: tuple[str, ...]
    references: tuple[str, ...]


def _rates(texts: Sequence[str]) -> tuple[float, float, float]:
    n = max(len(texts), 1)
    return (
        sum(len(words(t)) for t in texts) / n,
        sum(1 for t in texts if _PLACEHOLDER.search(t)) / n,
        sum(1 for t in texts if degenerate(t)) / n,
    )


def evaluate_models(
    specs: Sequence[str], examples: Sequence[Example], *, labels: Sequence[str] | None = None,
    system: str, device: str, data_dir: Path, batch_size: int = 8, max_seq_len: int = 512,
    max_new_tokens: int = 160, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
    embedder: str = "minilm", progress: bool = False,
) -> Report:
    """Score every model on the same examples; one model in memory at a time."""
    import torch
    from sentence_transformers import SentenceTransformer

    from core.generation.model_files import encoder_dir

    pairs = [prompt_and_reference(e) for e in examples]
    prompts = [p for p, _ in pairs]
    references = [r for _, r in pairs]
    encoder = SentenceTransformer(str(encoder_dir(embedder)), device=device)
    ref_vectors = encoder.encode(references, normalize_embeddings=True,
                                 convert_to_tensor=True)
    scores: list[ModelScores] = []
    for k, spec in enumerate(specs):
        folder = model_folder(spec, data_dir)
        label = labels[k] if labels else _label(spec, folder)
        if progress:
            print(f"eval: {label} ({folder}) on {len(examples)} examples", file=sys.stderr)
        model, tokenizer = load_model(folder, device)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        encoded, _ = encode_all(examples, tokenizer, system=system, max_len=max_seq_len)
        loss = mean_loss(model, encoded, batch_size=batch_size, device=device, pad_id=pad_id)
        started = time.monotonic()
        replies = generate(model, tokenizer, prompts, system=system, device=device,
                           batch_size=batch_size, max_new_tokens=max_new_tokens,
                           max_prompt_tokens=max_seq_len,
                           repetition_penalty=repetition_penalty,
                           no_repeat_ngram_size=no_repeat_ngram_size)
        seconds = (time.monotonic() - started) / max(len(replies), 1)
        vectors = encoder.encode(replies, normalize_embeddings=True, convert_to_tensor=True)
        similarity = float((vectors * ref_vectors).sum(dim=1).mean())
        mean_words, placeholders, degenerated = _rates(replies)
        scores.append(ModelScores(
            label, str(folder), loss,
            sum(rouge_l(h, r) for h, r in zip(replies, references, strict=True))
            / max(len(replies), 1),
            chrf(replies, references), similarity, mean_words, placeholders, degenerated,
            seconds, tuple(replies)))
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    last_user = [next((t.content for t in reversed(p.turns) if t.role == "user"), "")
                 for p in prompts]
    return Report(tuple(scores), tuple(last_user), tuple(references))


def _label(spec: str, folder: Path) -> str:
    if spec == "smollm2":
        return "base (smollm2)"
    return folder.parent.name if folder.name in ("merged", "adapter") else folder.name


def markdown_table(report: Report) -> str:
    """One row per model and one for the references; ROUGE-L change relative to row 1."""
    head = ("| model | loss | ppl | ROUGE-L | vs first | chrF | MiniLM sim | words | "
            "placeholders | degenerate | s/reply |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    first = report.models[0].rouge_l if report.models else 0.0
    for m in report.models:
        change = f"{(m.rouge_l / first - 1) * 100:+.0f}%" if first > 0 else "-"
        lines.append(
            f"| {m.label} | {m.loss:.3f} | {m.perplexity:.2f} | {m.rouge_l:.4f} | {change} | "
            f"{m.chrf:.2f} | {m.similarity:.3f} | {m.mean_words:.1f} | "
            f"{m.placeholder_rate:.0%} | {m.degenerate_rate:.0%} | {m.seconds_per_reply:.2f} |")
    ref_words, ref_ph, ref_deg = _rates(report.references)
    lines.append(f"| reference replies | - | - | - | - | - | - | {ref_words:.1f} | "
                 f"{ref_ph:.0%} | {ref_deg:.0%} | - |")
    return "\n".join(lines)


def side_by_side(report: Report, n: int = 5, width: int = 320) -> str:
    def cut(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else text[:width - 1] + "…"

    out: list[str] = []
    for i in range(min(n, len(report.prompts))):
        out += [f"### Example {i + 1}", "", f"- **customer**: {cut(report.prompts[i])}",
                f"- **reference**: {cut(report.references[i])}"]
        out += [f"- **{m.label}**: {cut(m.replies[i]) or '(empty)'}" for m in report.models]
        out.append("")
    return "\n".join(out)


# --- command line --------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    p = parser.add_argument
    p("--model", action="append", required=True, metavar="PATH",
      help="a merged, adapter or fine-tune output folder (repeat to compare several)")
    p("--data", nargs="+", required=True, metavar="PATH",
      help="held-out conversations (e.g. OUT/heldout.jsonl), any training format")
    p("--base", default="smollm2", help="the base model scored first (default smollm2)")
    p("--no-base", dest="with_base", action="store_false", help="do not score the base")
    p("--eval-split", type=float, default=0.0,
      help="score only the held-out part of --data, split as the fine-tune does (e.g. 0.1)")
    p("--seed", type=int, default=13, help="seed of that split (default 13)")
    p("--limit", type=int, default=100, help="examples scored (default 100; 0 = all)")
    p("--max-new-tokens", type=int, default=160)
    p("--max-seq-len", type=int, default=512, help="tokens for the loss and the prompt")
    p("--batch-size", type=int, default=8)
    p("--repetition-penalty", type=float, default=1.0,
      help="decoding (default 1.0: the raw model, so loops show)")
    p("--no-repeat-ngram-size", type=int, default=0)
    p("--system", default=None, help="system prompt (default: the bot's)")
    p("--examples", type=int, default=5, help="side-by-side examples shown (default 5)")
    p("--skip-bad", action="store_true")
    p("--data-dir", type=Path, default=Path("data"))
    p("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p("--threads", type=int, default=0)
    p("--report", type=Path, default=None, help="also write the markdown report here")
    p("--json", type=Path, default=None, help="also write every score and reply as JSON")


def run(args: argparse.Namespace) -> int:
    import torch

    from core.generation.model_files import ModelNotFound

    try:
        device = resolve_device(args.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        dataset = load(args.data, skip_bad=args.skip_bad)
        examples = list(dataset.examples)
        if args.eval_split > 0:
            _, examples = split(examples, args.eval_split, args.seed)
        if args.limit > 0:
            examples = examples[:args.limit]
        if not examples:
            raise DataError(args.data[0], 0, "no examples to evaluate")
        specs = ([args.base] if args.with_base else []) + list(args.model)
        system = default_system() if args.system is None else args.system
        report = evaluate_models(
            specs, examples, system=system, device=device, data_dir=args.data_dir,
            batch_size=args.batch_size, max_seq_len=args.max_seq_len,
            max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
            no_repeat_ngram_size=args.no_repeat_ngram_size, progress=True)
    except (DataError, ModelNotFound) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = (f"Held-out: {len(examples)} conversations from "
            f"{', '.join(map(str, args.data))}; greedy decoding, max {args.max_new_tokens} "
            f"new tokens.\n\n{markdown_table(report)}\n\n{side_by_side(report, args.examples)}")
    print(text)
    if args.report:
        args.report.write_text(text + "\n")
    if args.json:
        payload = {"examples": len(examples), "data": [str(d) for d in args.data],
                   "models": [asdict(m) for m in report.models],
                   "prompts": report.prompts, "references": report.references}
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


run_module(__name__)
