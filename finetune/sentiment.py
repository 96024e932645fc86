"""``supportbot finetune sentiment``: fine-tune the whole MiniLM encoder with a 3-class head.

The result is a plain Hugging Face sequence-classification folder (weights, tokenizer,
config with the dev-tuned P(negative) threshold and per-class logit bias, and a model card
with its figures), which the runtime picks up through ``[sentiment] model`` and
``pipeline("text-classification")`` can load as is. Built for a small CPU: short sequences,
length-bucketed dynamic padding, a thread count and a time budget.

The defaults are the recipe behind ``data/models/sentiment-minilm``: 4 epochs at lr 8e-5,
best dev checkpoint, then the logit bias fitted on dev. ``--init FOLDER`` continues from a
fine-tuned folder (whose own dev score is the checkpoint to beat); with ``--epochs 0`` it
only refits the dev threshold and bias. ``--soup A B ...`` averages the weights of folders
fine-tuned from the same MiniLM (a "model soup": one model, the cost of one at run time)
and refits the dev corrections; with ``--greedy`` only the folders the greedy-soup
procedure keeps on dev. ``--unlabeled TWACS --teacher FOLDER`` adds unlabeled customer
tweets with the teacher's probabilities as soft targets (distillation). Everything is
chosen on dev; test is only reported.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from core.sentiment import logit_scale
from finetune.sentiment_data import (
    DEFAULT_DATA,
    LABELS,
    NORMALIZATION,
    DataError,
    Dataset,
    Example,
    Scores,
    apply_logit_bias,
    apply_logit_scale,
    decide,
    fit_logit_bias,
    fit_logit_scale,
    load,
    score,
    tune_negative_threshold,
)
from finetune.sentiment_head import minilm_path
from finetune.sentiment_unlabeled import DEFAULT_LIMIT, EXAMPLE_UNLABELED, load_unlabeled
from finetune.tool import run_module

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_OUT = Path("data/models/sentiment-minilm")
MAX_LENGTH = 64


@dataclass(frozen=True, slots=True)
class TrainConfig:
    epochs: float = 4.0
    batch_size: int = 32
    lr: float = 8e-5
    weight_decay: float = 0.01
    warmup: float = 0.06
    evals_per_epoch: int = 3
    patience: int = 4
    max_minutes: float = 0.0
    """Stop training after this many minutes (0: no limit); the best dev checkpoint is kept."""
    class_weights: bool = True
    seed: int = 0
    threads: int = 1


class FineTuned:
    """A fine-tuned folder as a classifier: probabilities and thresholded labels."""

    __slots__ = ("_model", "_tokenizer", "logit_bias", "logit_scale", "negative_threshold",
                 "path")

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise DataError(f"{self.path}: not a fine-tuned model folder (no config.json)")
        self._tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self._model = AutoModelForSequenceClassification.from_pretrained(str(self.path))
        self._model.eval()
        names = [self._model.config.id2label[i].lower() for i in range(len(LABELS))]
        if tuple(names) != LABELS:
            raise DataError(f"{self.path}: labels {names} are not {list(LABELS)}")
        raw = getattr(self._model.config, "negative_threshold", None)
        self.negative_threshold = float(raw) if raw is not None else None
        bias = getattr(self._model.config, "logit_bias", None)
        self.logit_bias = tuple(float(b) for b in bias) if bias is not None else None
        try:
            self.logit_scale = logit_scale(self._model.config, self.path / "config.json")
        except ValueError as exc:
            raise DataError(str(exc)) from None

    def probabilities(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """The model's probabilities with its dev-fitted logit scale (temperature), before
        the threshold or the bias."""
        raw = _probabilities(self._model, self._tokenizer, texts, batch_size)
        if self.logit_scale == 1.0:
            return raw
        return np.asarray(apply_logit_scale(raw.tolist(), self.logit_scale))

    def predict(self, texts: Sequence[str], use_threshold: bool = True) -> list[int]:
        threshold = self.negative_threshold if use_threshold else None
        return decide(self.probabilities(texts).tolist(), threshold)


@torch.inference_mode()
def _probabilities(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
    batch_size: int,
) -> np.ndarray:
    """Batched by length so padding stays short; results come back in input order."""
    was_training = model.training
    model.eval()
    out = np.zeros((len(texts), len(LABELS)), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                        max_length=MAX_LENGTH, return_tensors="pt")
        logits = model(**enc).logits
        out[idx] = torch.softmax(logits.float(), dim=-1).numpy()
    model.train(was_training)
    return out


def _soft_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
) -> torch.Tensor:
    """Weighted mean of -sum(target * log p): hard and soft targets in one loss."""
    per_example = -(targets * torch.log_softmax(logits, dim=-1)).sum(dim=-1)
    return (per_example * weight).sum() / weight.sum().clamp(min=1e-12)


@dataclass(frozen=True, slots=True)
class SoftLabels:
    """Unlabeled texts with a teacher's probabilities (in :data:`LABELS` order)."""

    texts: tuple[str, ...]
    probabilities: tuple[tuple[float, ...], ...]
    source: str
    """Where the texts and the teacher came from, for the model card."""


def teacher_labels(teacher: Path, texts: Sequence[str], source: str) -> SoftLabels:
    """``teacher``'s calibrated probabilities (its logit scale, not its bias: the bias
    is a decision rule fitted on dev, the targets should stay probabilities)."""
    probs = FineTuned(teacher).probabilities(texts)
    return SoftLabels(tuple(texts), tuple(tuple(map(float, p)) for p in probs), source)


def training_targets(
    train_set: Sequence[Example], soft: SoftLabels | None, class_weights: bool,
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Texts, target distributions and loss weights: the gold tweets one-hot, then the
    unlabeled texts with the teacher's probabilities.

    Class weights (inverse frequency) come from the gold labels; each example weighs its
    target's expected class weight, which for a gold label is exactly torch's
    class-weighted cross-entropy and for a soft target its blend."""
    texts = [e.text for e in train_set]
    labels = torch.tensor([e.label for e in train_set])
    targets = torch.nn.functional.one_hot(labels, len(LABELS)).float()
    if soft is not None and soft.texts:
        texts += list(soft.texts)
        targets = torch.cat([targets, torch.tensor(soft.probabilities, dtype=torch.float32)])
    if class_weights:
        counts = torch.bincount(labels, minlength=len(LABELS)).float().clamp(min=1)
        class_weight = len(labels) / (len(LABELS) * counts)
    else:
        class_weight = torch.ones(len(LABELS))
    return texts, targets, targets @ class_weight


@dataclass(frozen=True, slots=True)
class DevFit:
    """One model's corrections fitted on dev, and its dev scores with them."""

    scale: float
    threshold: float
    bias: tuple[float, float, float]
    bias_fitted: bool
    dev: Scores
    """With the P(negative) threshold."""
    dev_bias: Scores
    """With the scale and the bias, labelled by argmax: the service's rule."""


def fit_on_dev(gold: Sequence[int], raw: list[list[float]]) -> DevFit:
    """Scale (temperature) first, then threshold and bias on the scaled probabilities."""
    scale = fit_logit_scale(gold, raw)
    probs = apply_logit_scale(raw, scale)
    threshold = tune_negative_threshold(gold, probs)
    fitted = fit_logit_bias(gold, probs)
    bias = fitted or (0.0, 0.0, 0.0)
    return DevFit(scale, threshold, bias, fitted is not None, score(gold, decide(probs, threshold)),
                  score(gold, decide(apply_logit_bias(probs, bias), None)))


def _dev_f1(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
    gold: Sequence[int],
) -> float:
    return score(gold, decide(_probabilities(model, tokenizer, texts, 64).tolist(), None)).macro_f1


def _batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar length: on CPU, padding is most of the cost otherwise."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


@dataclass(frozen=True, slots=True)
class FineTuneResult:
    dev: Scores
    test: Scores | None
    test_argmax: Scores | None
    negative_threshold: float
    logit_bias: tuple[float, float, float]
    dev_bias: Scores
    test_bias: Scores | None
    bias_fitted: bool
    logit_scale: float
    steps: int
    epochs_done: float
    best_step: int
    minutes: float
    stopped_by: str
    start: str
    """What training started from: the base MiniLM or a fine-tuned folder."""
    soft_count: int = 0
    soft_source: str = ""


def finetune(
    train_set: list[Example],
    dev_set: list[Example],
    test_set: list[Example],
    out: Path,
    cfg: TrainConfig,
    base: Path | None = None,
    log: Callable[[str], None] = print,
    origin: str | None = None,
    soft: SoftLabels | None = None,
) -> FineTuneResult:
    """Train, keep the best dev macro-F1 checkpoint, fit threshold and bias on dev, save.

    ``base`` is a fine-tuned folder to continue from (its own dev score is the first
    checkpoint to beat), or None for the plain MiniLM. ``cfg.epochs == 0`` trains nothing and
    only refits the dev corrections of ``base``. ``soft`` adds unlabeled texts with a
    teacher's probabilities as targets (distillation), shuffled in with the gold tweets.
    """
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        get_linear_schedule_with_warmup,
    )

    if not train_set or not dev_set:
        raise DataError("fine-tuning needs examples in both the train and the dev split")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    continuing = base is not None
    if cfg.epochs <= 0 and not continuing:
        raise DataError("--epochs 0 only refits the dev corrections of a trained folder: "
                        "pass --init FOLDER")
    if base is not None and not (base / "config.json").is_file():
        raise DataError(f"--init {base}: not a fine-tuned model folder (no config.json)")
    base = base or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base),
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
    )
    texts, targets, example_weight = training_targets(train_set, soft, cfg.class_weights)
    encoded = tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    lengths = [len(ids) for ids in encoded]
    rng = random.Random(cfg.seed)
    steps_per_epoch = math.ceil(len(texts) / cfg.batch_size)
    total_steps = max(0, int(steps_per_epoch * cfg.epochs))
    eval_every = max(1, steps_per_epoch // max(1, cfg.evals_per_epoch))
    no_decay = ("bias", "LayerNorm.weight")
    params = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
         "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)],
         "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(cfg.warmup * total_steps), max(1, total_steps)
    )
    dev_texts = [e.text for e in dev_set]
    dev_gold = [e.label for e in dev_set]

    started = time.monotonic()
    deadline = started + cfg.max_minutes * 60 if cfg.max_minutes > 0 else math.inf
    best_f1, best_step, best_state = -1.0, 0, copy.deepcopy(model.state_dict())
    if continuing:
        best_f1 = _dev_f1(model, tokenizer, dev_texts, dev_gold)
        log(f"step 0/{total_steps} (from {base}) dev macro-F1 {best_f1:.4f}")
    bad_evals, step, stopped_by, running = 0, 0, "epochs", 0.0
    model.train()
    while step < total_steps and stopped_by == "epochs":
        for batch in _batches(lengths, cfg.batch_size, rng):
            enc = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")
            logits = model(**enc).logits
            loss = _soft_cross_entropy(logits, targets[batch], example_weight[batch])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
            out_of_time = time.monotonic() >= deadline
            if step % eval_every == 0 or step == total_steps or out_of_time:
                f1 = _dev_f1(model, tokenizer, dev_texts, dev_gold)
                minutes = (time.monotonic() - started) / 60
                log(f"step {step}/{total_steps} epoch {step / steps_per_epoch:.2f} "
                    f"loss {running:.4f} dev macro-F1 {f1:.4f} ({minutes:.1f} min)")
                if f1 > best_f1:
                    best_f1, best_step, bad_evals = f1, step, 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    bad_evals += 1
                    if bad_evals >= cfg.patience:
                        stopped_by = "early stopping"
            if out_of_time and stopped_by == "epochs":
                stopped_by = "time budget"
            if stopped_by != "epochs" or step >= total_steps:
                break
    minutes = (time.monotonic() - started) / 60
    model.load_state_dict(best_state)
    model.eval()
    fit = fit_on_dev(dev_gold, _probabilities(model, tokenizer, dev_texts, 64).tolist())
    scale, threshold, bias = fit.scale, fit.threshold, fit.bias
    dev_scores, dev_bias, fitted = fit.dev, fit.dev_bias, fit.bias_fitted
    log(f"dev-fitted logit scale {scale}")
    if not fitted:
        log("no logit bias keeps negative recall >= 0.90 and precision >= 0.85 on dev; "
            "none applied")
    log(f"dev-fitted logit bias {bias}: dev macro-F1 {dev_bias.macro_f1:.4f}")
    test_scores = test_argmax = test_bias = None
    if test_set:
        test_probs = apply_logit_scale(
            _probabilities(model, tokenizer, [e.text for e in test_set], 64).tolist(), scale)
        test_gold = [e.label for e in test_set]
        test_scores = score(test_gold, decide(test_probs, threshold))
        test_argmax = score(test_gold, decide(test_probs, None))
        test_bias = score(test_gold, decide(apply_logit_bias(test_probs, bias), None))
    result = FineTuneResult(
        dev=dev_scores, test=test_scores, test_argmax=test_argmax,
        negative_threshold=threshold, logit_bias=bias, dev_bias=dev_bias, test_bias=test_bias,
        steps=step, epochs_done=step / steps_per_epoch,
        best_step=best_step, minutes=minutes, stopped_by=stopped_by,
        start=origin or (str(base) if continuing else "sentence-transformers/all-MiniLM-L6-v2"),
        bias_fitted=fitted, logit_scale=scale,
        soft_count=len(soft.texts) if soft else 0, soft_source=soft.source if soft else "",
    )
    model.config.negative_threshold = round(threshold, 4)
    model.config.logit_bias = list(bias)
    model.config.logit_scale = scale
    model.config.text_normalization = NORMALIZATION
    model.config.max_seq_length = MAX_LENGTH
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.model_max_length = MAX_LENGTH
    tokenizer.save_pretrained(str(out))
    (out / "README.md").write_text(model_card(result, cfg, len(train_set), len(dev_set)))
    return result


WEIGHTS = "model.safetensors"


def _check_soup_out(folders: Sequence[Path], out: Path) -> None:
    if any(out.resolve() == folder.resolve() for folder in folders):
        raise DataError(f"--out {out} is one of the --soup folders: write the soup elsewhere "
                        "(an ingredient would be overwritten)")


def make_soup(folders: Sequence[Path], out: Path) -> None:
    """Write the uniform average of ``folders``' weights to ``out`` with the first one's
    config and tokenizer (Wortsman et al., 2022: fine-tunes of one pre-trained model sit
    in one basin, so their average is usually better than either and costs nothing more
    to run). A folder that is not a fine-tune of the same shape is named."""
    from safetensors.torch import load_file, save_file

    if len(folders) < 2:
        raise DataError("--soup needs at least two fine-tuned folders")
    _check_soup_out(folders, out)
    states = []
    for folder in folders:
        if not (folder / WEIGHTS).is_file() or not (folder / "config.json").is_file():
            raise DataError(f"--soup {folder}: not a fine-tuned model folder "
                            f"(no {WEIGHTS} or config.json)")
        states.append(load_file(str(folder / WEIGHTS)))
    first = states[0]
    for folder, state in zip(folders[1:], states[1:], strict=True):
        if state.keys() != first.keys() or any(
                state[k].shape != first[k].shape for k in first):
            raise DataError(f"--soup {folder}: its weights do not match {folders[0]}'s "
                            "(a different architecture or label set)")
    averaged = {k: (sum(st[k].double() for st in states) / len(states)).to(first[k].dtype)
                for k in first}
    out.mkdir(parents=True, exist_ok=True)
    for item in folders[0].iterdir():
        if item.is_file() and item.name not in (WEIGHTS, "README.md"):
            shutil.copyfile(item, out / item.name)
    save_file({k: v.contiguous() for k, v in averaged.items()}, str(out / WEIGHTS),
              metadata={"format": "pt"})


def greedy_soup(
    folders: Sequence[Path], dev_set: Sequence[Example], log: Callable[[str], None] = print,
) -> list[Path]:
    """The ingredients Wortsman et al.'s greedy soup keeps: sorted by their own dev
    macro-F1 (after their dev corrections, the service's rule), each added only if the
    soup's does not fall; equal scores keep the command-line order. A fixed procedure, so
    which seeds ship is not picked by hand."""
    import tempfile

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts, gold = [e.text for e in dev_set], [e.label for e in dev_set]

    for folder in folders:
        if not (folder / WEIGHTS).is_file() or not (folder / "config.json").is_file():
            raise DataError(f"--soup {folder}: not a fine-tuned model folder "
                            f"(no {WEIGHTS} or config.json)")

    def dev_f1(folder: Path) -> float:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForSequenceClassification.from_pretrained(str(folder))
        return fit_on_dev(gold, _probabilities(model, tokenizer, texts, 64).tolist()
                          ).dev_bias.macro_f1

    own = {folder: dev_f1(folder) for folder in folders}
    order = sorted(folders, key=lambda f: -own[f])
    for folder in order:
        log(f"greedy soup: {folder} alone, dev macro-F1 {own[folder]:.4f}")
    chosen, best = [order[0]], own[order[0]]
    with tempfile.TemporaryDirectory(prefix="soup-") as tmp:
        for n, folder in enumerate(order[1:], 1):
            trial = Path(tmp) / f"trial{n}"
            make_soup([*chosen, folder], trial)
            f1 = dev_f1(trial)
            kept = f1 >= best
            log(f"greedy soup: + {folder}: dev macro-F1 {f1:.4f} "
                f"({'kept' if kept else 'left out'}; best so far {best:.4f})")
            if kept:
                chosen, best = [*chosen, folder], f1
            shutil.rmtree(trial)
    return chosen


def _row(name: str, s: Scores | None) -> str:
    if s is None:
        return f"| {name} | - | - | - | - |"
    return (f"| {name} | {s.accuracy:.3f} | {s.macro_f1:.3f} | "
            f"{s.negative_precision:.3f} | {s.negative_recall:.3f} |")


def model_card(r: FineTuneResult, cfg: TrainConfig, n_train: int, n_dev: int) -> str:
    bias_note = "" if r.bias_fitted else (
        " (no bias on the grid kept both limits on dev, so none is applied)")
    distilled = (f" and {r.soft_count} unlabeled texts with soft targets ({r.soft_source})"
                 if r.soft_count else "")
    twacs = (", and so are the unlabeled TwACS customer tweets (from Kaggle's Customer "
             "Support on Twitter)" if r.soft_count else "")
    confusion = ""
    if r.test_bias is not None:
        head = "| true \\ predicted | " + " | ".join(LABELS) + " |\n|---|---:|---:|---:|\n"
        body = "".join(
            f"| {LABELS[i]} | " + " | ".join(str(v) for v in row) + " |\n"
            for i, row in enumerate(r.test_bias.confusion)
        )
        confusion = f"\nTest confusion matrix (with the logit bias):\n\n{head}{body}"
    return f"""---
library_name: transformers
pipeline_tag: text-classification
base_model: sentence-transformers/all-MiniLM-L6-v2
---
# sentiment-minilm

all-MiniLM-L6-v2 fine-tuned end to end (BertForSequenceClassification, labels
{", ".join(LABELS)}) on the Twitter US Airline Sentiment tweets, deduplicated on
`tweet_id`, split 80/10/10 by a SHA-1 hash of `tweet_id`. Made by
`supportbot finetune sentiment`. Input text is normalised first (`{NORMALIZATION}`:
@handles to `@user`, links to `http`, emoji also written as their names); use
`core.social_text.normalize` before classifying.

`config.json` holds `negative_threshold` = {r.negative_threshold:.4f}: tuned on dev for the
best macro-F1 keeping negative recall >= 0.90; a text is negative when P(negative) is at
least that, otherwise the larger of neutral and positive.

`config.json` holds `logit_scale` = {r.logit_scale} too: the logits are multiplied by it
first (temperature scaling fitted on dev for the lowest log-loss), so the probabilities
that thresholds such as escalation read are calibrated; the threshold and bias below are
fitted after it.

`config.json` also holds `logit_bias` = {list(r.logit_bias)} (one per label, added to the
logits): a prior correction fitted on dev for the best macro-F1 keeping negative recall
>= 0.90 and precision >= 0.85{bias_note}. The service
(`core.sentiment.FineTunedClassifier`) applies it and labels by argmax.

| split | accuracy | macro-F1 | negative precision | negative recall |
|---|---:|---:|---:|---:|
{_row(f"dev ({n_dev}, threshold)", r.dev)}
{_row("test (argmax)", r.test_argmax)}
{_row("test (threshold)", r.test)}
{_row(f"dev ({n_dev}, logit bias)", r.dev_bias)}
{_row("test (logit bias, used by the service)", r.test_bias)}
{confusion}
Training from {r.start}: {n_train} tweets{distilled},
{r.steps} steps ({r.epochs_done:.2f} epochs) in {r.minutes:.1f} min on CPU with
{cfg.threads} thread(s); stopped by {r.stopped_by}; best dev checkpoint at step {r.best_step}.
batch {cfg.batch_size}, lr {cfg.lr}, weight decay {cfg.weight_decay}, warmup {cfg.warmup},
max_length {MAX_LENGTH}, class-weighted loss {cfg.class_weights}, seed {cfg.seed}.

Data license: the tweets are CC BY-NC-SA 4.0 (CrowdFlower "Data for Everyone"){twacs};
this model is trained on them and is for non-commercial use.
"""


def configure(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="airline Tweets.csv")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model folder to write")
    parser.add_argument("--epochs", type=float, default=d.epochs)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--evals-per-epoch", type=int, default=d.evals_per_epoch)
    parser.add_argument("--patience", type=int, default=d.patience,
                        help="dev evaluations without improvement before stopping")
    parser.add_argument("--max-minutes", type=float, default=d.max_minutes,
                        help="time budget for training; 0 means none")
    parser.add_argument("--no-class-weights", action="store_true")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=int, default=d.threads, help="torch threads")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from this fine-tuned folder instead of the base MiniLM")
    parser.add_argument("--unlabeled", type=Path, default=None, metavar="PATH",
                        help="TwACS customer tweets (csv or csv.bz2) to distil --teacher into "
                             f"the student, e.g. {EXAMPLE_UNLABELED}")
    parser.add_argument("--teacher", type=Path, default=None, metavar="FOLDER",
                        help="fine-tuned folder whose probabilities label --unlabeled")
    parser.add_argument("--unlabeled-limit", type=int, default=DEFAULT_LIMIT,
                        help="a sample of this many unlabeled texts, fixed by --seed (0: all)")
    parser.add_argument("--soup", type=Path, nargs="+", default=None, metavar="FOLDER",
                        help="average these fine-tuned folders' weights into --out and refit "
                             "the dev corrections (no training)")
    parser.add_argument("--greedy", action="store_true",
                        help="with --soup: keep only the folders the greedy soup procedure "
                             "picks on dev")


def _check_options(args: argparse.Namespace) -> None:
    """Every option conflict, before anything is read, trained or written."""
    if args.greedy and not args.soup:
        raise DataError("--greedy picks among --soup folders: pass --soup A B ...")
    if (args.unlabeled is None) != (args.teacher is None):
        raise DataError("--unlabeled and --teacher go together: the teacher labels the texts")
    if args.soup:
        if args.init is not None:
            raise DataError("--soup and --init exclude each other: the soup is the start")
        if args.unlabeled is not None:
            raise DataError("--soup trains nothing: it cannot take --unlabeled/--teacher")
        if len(args.soup) < 2:
            raise DataError("--soup needs at least two fine-tuned folders")
        if len({folder.resolve() for folder in args.soup}) < len(args.soup):
            raise DataError("--soup names a folder twice")
        _check_soup_out(args.soup, args.out)
    elif args.unlabeled is not None and args.epochs <= 0:
        raise DataError("--epochs 0 trains nothing: it cannot take --unlabeled/--teacher")


def _soft_labels(args: argparse.Namespace, data: Dataset) -> SoftLabels | None:
    """The teacher-labelled unlabeled texts that ``--unlabeled``/``--teacher`` ask for."""
    if args.unlabeled is None:
        return None
    held_out = [e.text for e in data.split("dev") + data.split("test")]
    unlabeled = load_unlabeled(args.unlabeled, held_out, args.unlabeled_limit, args.seed)
    print(f"{len(unlabeled.texts)} unlabeled texts from {unlabeled.path} "
          f"({unlabeled.turns_read} customer turns: {unlabeled.without_words} without words, "
          f"{unlabeled.duplicates} duplicates, {unlabeled.held_out_dropped} equal to a "
          f"dev/test tweet); labelling them with {args.teacher}", flush=True)
    return teacher_labels(args.teacher, unlabeled.texts,
                          f"{unlabeled.path}, labelled by {args.teacher}")


def run(args: argparse.Namespace) -> int:
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, evals_per_epoch=args.evals_per_epoch,
        patience=args.patience, max_minutes=args.max_minutes,
        class_weights=not args.no_class_weights, seed=args.seed, threads=args.threads,
    )
    if cfg.threads:  # also for the teacher's labelling and the greedy soup's evaluations
        torch.set_num_threads(cfg.threads)
    base, origin = args.init, None
    try:
        _check_options(args)
        data = load(args.data)
        if args.soup:
            folders = list(args.soup)
            if args.greedy:
                folders = greedy_soup(folders, data.split("dev"),
                                      log=lambda line: print(line, flush=True))
            cfg = replace(cfg, epochs=0.0)
            if len(folders) == 1:
                print(f"the greedy soup keeps {folders[0]} alone", flush=True)
                base, origin = folders[0], f"{folders[0]} (the greedy soup kept it alone)"
            else:
                make_soup(folders, args.out)
                print(f"soup of {', '.join(map(str, folders))} -> {args.out}", flush=True)
                base = args.out
                origin = f"the weight average of {', '.join(map(str, folders))}"
        soft = _soft_labels(args, data)
        result = finetune(data.split("train"), data.split("dev"), data.split("test"),
                          args.out, cfg, base=base, origin=origin,
                          log=lambda line: print(line, flush=True), soft=soft)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"saved {args.out} after {result.steps} steps ({result.epochs_done:.2f} epochs, "
          f"{result.minutes:.1f} min, stopped by {result.stopped_by}); "
          f"P(negative) threshold {result.negative_threshold:.4f}")
    print(f"dev-fitted logit scale {result.logit_scale}, logit bias {list(result.logit_bias)}")
    for name, s in (("dev", result.dev), ("test (argmax)", result.test_argmax),
                    ("test", result.test), ("dev (logit bias)", result.dev_bias),
                    ("test (logit bias)", result.test_bias)):
        if s is not None:
            print(f"{name}: accuracy {s.accuracy:.3f}  macro-F1 {s.macro_f1:.3f}  "
                  f"negative P {s.negative_precision:.3f} R {s.negative_recall:.3f}")
    return 0


run_module(__name__)
