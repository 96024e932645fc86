"""Fine-tune the reply generator with LoRA on support conversations (offline).

Reads Bitext CSV, TwACS threads or our JSONL export (see ``finetune.conversations``),
formats them with the model's chat template and the bot's system prompt, and trains a LoRA
adapter with the loss on assistant turns only. Resumable from checkpoints, with an eval loss
every N steps and early stopping. The output folder holds ``adapter/`` (vLLM
``--enable-lora``), ``merged/`` (``vllm serve`` or the embedded backend as it is), the
held-out split as JSONL, the loss history and a model card ``README.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from finetune.causal_lm import (
    IGNORE,
    Encoded,
    autocast,
    collate,
    default_system,
    encode_all,
    mean_loss,
    resolve_base,
    resolve_device,
    token_loss,
)
from finetune.conversations import DataError, Dataset, Example, load, split, write_jsonl
from finetune.eval_generator import evaluate_models, markdown_table
from finetune.tool import run_module

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
# Settings a resumed run must share with its checkpoint, or the result is not one run.
_RESUME_KEYS = (
    "data", "base", "system", "skip_bad", "redact_pii", "eval_split", "seed", "max_seq_len",
    "lora_r", "lora_alpha", "lora_dropout", "target_modules", "lr", "schedule",
    "warmup_steps", "weight_decay", "max_grad_norm", "batch_size", "grad_accum",
    "total_steps",
)


# --- command line --------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    p = parser.add_argument
    p("--data", nargs="+", required=True, metavar="PATH",
      help="training files: Bitext .csv, TwACS .csv[.bz2], or our .jsonl export")
    p("--base", default="smollm2",
      help="'smollm2' (the embedded model, converted once) or a Hugging Face model folder")
    p("--out", required=True, type=Path, help="output folder")
    p("--data-dir", type=Path, default=Path("data"),
      help="where the embedded model is converted to (default: data)")
    p("--system", default=None,
      help="system prompt put before every conversation (default: the bot's)")
    p("--skip-bad", action="store_true", help="skip and count bad rows instead of stopping")
    p("--redact-pii", action="store_true",
      help="replace emails, phone/card numbers and order ids by placeholders")
    p("--eval-split", type=float, default=0.1,
      help="held-out fraction, by content hash, stratified by intent (default 0.1)")
    p("--eval-examples", type=int, default=128,
      help="held-out examples used for the eval loss (default 128; 0 = all)")
    p("--eval-every", type=int, default=50, help="eval loss every N steps (default 50)")
    p("--patience", type=int, default=3,
      help="stop after N evals without improvement (default 3; 0 = never)")
    p("--min-delta", type=float, default=0.0, help="smallest eval-loss gain that counts")
    p("--no-load-best", dest="load_best", action="store_false",
      help="keep the last weights even if an earlier eval was better")
    p("--lora-r", type=int, default=16, help="LoRA rank (default 16; vLLM's default cap)")
    p("--lora-alpha", type=float, default=32.0)
    p("--lora-dropout", type=float, default=0.05)
    p("--target-modules", default=DEFAULT_TARGETS,
      help=f"comma-separated module names (default {DEFAULT_TARGETS})")
    p("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    p("--schedule", choices=SCHEDULES, default="cosine")
    p("--warmup-steps", type=int, default=None, help="default: 5%% of the steps")
    p("--weight-decay", type=float, default=0.0)
    p("--max-grad-norm", type=float, default=1.0)
    p("--epochs", type=float, default=1.0, help="passes over the training split (default 1)")
    p("--max-steps", type=int, default=0, help="optimizer steps; overrides --epochs if > 0")
    p("--time-budget", type=float, default=0.0,
      help="stop training after this many minutes (then finish normally; 0 = none)")
    p("--batch-size", type=int, default=8, help="examples per micro-batch (default 8)")
    p("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p("--max-seq-len", type=int, default=512, help="tokens per example (default 512)")
    p("--seed", type=int, default=13)
    p("--save-every", type=int, default=0,
      help="checkpoint every N steps (default: same as --eval-every)")
    p("--keep-checkpoints", type=int, default=2, help="step checkpoints kept (default 2)")
    p("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
      help="continue from OUT/checkpoints (latest) or from the given checkpoint folder")
    p("--overwrite", action="store_true", help="replace an existing output folder")
    p("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p("--threads", type=int, default=0, help="CPU threads for torch (default: torch's)")
    p("--merged-dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
      help="dtype of merged/ (default bfloat16: half the size, what vLLM runs)")
    p("--eval-generate", type=int, default=0, metavar="N",
      help="after training, generate for N held-out prompts with base and tuned model "
           "and put the reply-quality table in the model card (slow on CPU)")
    p("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from core.generation.model_files import ModelNotFound

    try:
        return _Trainer(args).run()
    except (DataError, ModelNotFound) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


# --- training ------------------------------------------------------------------------------


class _Trainer:
    """One fine-tuning run; state lives here so the step loop stays readable."""

    __slots__ = ("args", "bad_evals", "base_eval", "best_loss", "best_step", "history", "out",
                 "saved_step", "settings", "stop_reason", "system", "targets", "tokens_seen",
                 "train_seconds")

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.system = default_system() if args.system is None else args.system
        self.history: list[dict[str, Any]] = []
        self.best_loss = math.inf
        self.best_step = -1
        self.bad_evals = 0
        self.base_eval: float | None = None
        self.stop_reason = "finished"
        self.train_seconds = 0.0
        self.tokens_seen = 0
        self.saved_step = -1
        self.targets: list[str] = []
        self.settings: dict[str, Any] = {}

    # setup ---------------------------------------------------------------------------------

    def _check_args(self) -> None:
        a = self.args
        for name in ("batch_size", "grad_accum", "max_seq_len", "eval_every", "lora_r"):
            if getattr(a, name) <= 0:
                raise DataError(f"--{name.replace('_', '-')}", 0, "must be a positive number")
        if a.max_seq_len < 16:
            raise DataError("--max-seq-len", 0, "must be at least 16")
        if not 0 <= a.eval_split < 1:
            raise DataError("--eval-split", 0, "must be in [0, 1)")
        if a.max_steps <= 0 and a.epochs <= 0:
            raise DataError("--epochs", 0, "give --epochs > 0 or --max-steps > 0")
        if a.resume is None and self.out.exists() and any(self.out.iterdir()):
            if not a.overwrite:
                raise DataError(
                    self.out, 0,
                    "output folder exists and is not empty: use --resume to continue it "
                    "or --overwrite to start again",
                )
            shutil.rmtree(self.out)

    def _load_data(self) -> Dataset:
        a = self.args
        dataset = load(a.data, skip_bad=a.skip_bad, redact=a.redact_pii)
        for f in dataset.files:
            bad = sum(v for k, v in f.skipped.items() if k.startswith("bad"))
            note = f", skipped {f.skipped}" if f.skipped else ""
            print(f"data: {f.path} ({f.format}): {f.examples} examples from {f.rows} rows"
                  f"{note}" + (" [--skip-bad]" if bad else ""), file=sys.stderr)
        if dataset.duplicates:
            print(f"data: {dataset.duplicates} duplicate conversations dropped", file=sys.stderr)
        return dataset

    def _settings(self, dataset: Dataset, base: Path, total_steps: int, warmup: int) -> dict:
        a = self.args
        return {
            "data": [[f.path, f.sha256] for f in dataset.files],
            "base": str(base.resolve()), "system": self.system, "skip_bad": a.skip_bad,
            "redact_pii": a.redact_pii, "eval_split": a.eval_split, "seed": a.seed,
            "max_seq_len": a.max_seq_len, "lora_r": a.lora_r, "lora_alpha": a.lora_alpha,
            "lora_dropout": a.lora_dropout, "target_modules": self.targets, "lr": a.lr,
            "schedule": a.schedule, "warmup_steps": warmup, "weight_decay": a.weight_decay,
            "max_grad_norm": a.max_grad_norm, "batch_size": a.batch_size,
            "grad_accum": a.grad_accum, "total_steps": total_steps,
            "eval_examples": a.eval_examples, "eval_every": a.eval_every,
            "patience": a.patience, "min_delta": a.min_delta, "epochs": a.epochs,
            "max_steps": a.max_steps, "time_budget_min": a.time_budget,
            "merged_dtype": a.merged_dtype, "base_spec": a.base, "command": command_line(a),
        }

    def run(self) -> int:
        import torch

        a = self.args
        self._check_args()
        self.targets = [t.strip() for t in a.target_modules.split(",") if t.strip()]
        device = resolve_device(a.device)
        if a.threads:
            torch.set_num_threads(a.threads)
        dataset = self._load_data()
        train_ex, held_ex = split(dataset.examples, a.eval_split, a.seed)
        if not train_ex:
            raise DataError(a.data[0], 0, "no training examples left after the held-out split")

        from transformers import AutoModelForCausalLM, AutoTokenizer

        base_dir = resolve_base(a.base, a.data_dir)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        if not getattr(tokenizer, "is_fast", False) or tokenizer.chat_template is None:
            raise DataError(base_dir, 0, "the base model needs a fast tokenizer with a chat "
                            "template (loss masking uses token offsets)")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        train, dropped = encode_all(train_ex, tokenizer, system=self.system,
                                    max_len=a.max_seq_len)
        held_all, _ = encode_all(held_ex, tokenizer, system=self.system, max_len=a.max_seq_len)
        held = held_all[:a.eval_examples] if a.eval_examples > 0 else held_all
        if not train:
            raise DataError(a.data[0], 0, f"no training example fits --max-seq-len "
                            f"{a.max_seq_len} with an assistant token left")
        per_epoch = math.ceil(len(train) / a.batch_size)
        total_steps = a.max_steps if a.max_steps > 0 else max(
            1, math.ceil(a.epochs * per_epoch / a.grad_accum))
        warmup = a.warmup_steps if a.warmup_steps is not None else int(0.05 * total_steps)
        self.settings = self._settings(dataset, base_dir, total_steps, warmup)
        print(f"train: {len(train)} examples ({dropped} dropped: nothing to learn within "
              f"{a.max_seq_len} tokens), held-out: {len(held_ex)} (eval loss on {len(held)}), "
              f"{total_steps} steps of {a.batch_size}x{a.grad_accum} on {device}",
              file=sys.stderr)

        resume_from = self._checkpoint_to_resume() if a.resume is not None else None
        self.out.mkdir(parents=True, exist_ok=True)
        write_jsonl(held_ex, self.out / "heldout.jsonl")

        torch.manual_seed(a.seed)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        model.config.use_cache = False
        from peft import LoraConfig, get_peft_model

        try:
            model = get_peft_model(model, LoraConfig(
                r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
                target_modules=self.targets, task_type="CAUSAL_LM", bias="none"))
        except ValueError as exc:
            raise DataError("--target-modules", 0, str(exc)) from None
        model.to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay)
        from transformers import get_scheduler

        scheduler = get_scheduler(a.schedule, optimizer, num_warmup_steps=warmup,
                                  num_training_steps=total_steps)
        step = 0
        if resume_from is not None:
            step = self._resume(model, optimizer, scheduler, device, *resume_from)
        else:
            self.base_eval = mean_loss(model, held, batch_size=a.batch_size, device=device,
                                       pad_id=pad_id) if held else None
            if self.base_eval is not None:
                self._record_eval(0, self.base_eval, model)

        step = self._loop(model, optimizer, scheduler, train, held, pad_id, device,
                          step, total_steps)
        final_eval = self.history[-1]["eval_loss"] if self.history and \
            self.history[-1].get("step") == step and "eval_loss" in self.history[-1] else None
        if final_eval is None and held:
            final_eval = mean_loss(model, held, batch_size=a.batch_size, device=device,
                                   pad_id=pad_id)
            self._record_eval(step, final_eval, model)
        if self.saved_step != step:
            self._save_checkpoint(model, optimizer, scheduler, step, device)
        used_step = step
        best = self.out / "checkpoints" / "best" / "adapter"
        if a.load_best and self.best_step > 0 and self.best_step != step and best.is_dir() \
                and final_eval is not None and self.best_loss < final_eval:
            self._load_adapter(model, best)
            used_step = self.best_step
        self._export(model, tokenizer, base_dir, dataset, held_ex, train, step, used_step,
                     final_eval, device)
        return 0

    # the loop ------------------------------------------------------------------------------

    def _micro_batches(self, step: int, n: int, cache: dict[int, list[int]]) -> list[list[int]]:
        """Indices of the micro-batches of one step: a pure function of the step, so a
        resumed run sees exactly the batches the interrupted one would have."""
        import torch

        a = self.args
        per_epoch = math.ceil(n / a.batch_size)
        out = []
        for j in range(a.grad_accum):
            g = step * a.grad_accum + j
            epoch, k = divmod(g, per_epoch)
            if epoch not in cache:
                gen = torch.Generator().manual_seed(a.seed * 1000 + epoch)
                cache.clear()
                cache[epoch] = torch.randperm(n, generator=gen).tolist()
            out.append(cache[epoch][k * a.batch_size:(k + 1) * a.batch_size])
        return out

    def _loop(self, model: Any, optimizer: Any, scheduler: Any, train: list[Encoded],
              held: list[Encoded], pad_id: int, device: str, step: int,
              total_steps: int) -> int:
        import torch
        from tqdm import tqdm

        a = self.args
        save_every = a.save_every or a.eval_every
        params = [p for p in model.parameters() if p.requires_grad]
        perms: dict[int, list[int]] = {}
        recent: list[float] = []
        last_eval = self.history[-1].get("eval_loss") if self.history else None
        model.train()
        bar = tqdm(total=total_steps, initial=step, desc="finetune", unit="step",
                   disable=not a.progress, dynamic_ncols=True, file=sys.stderr)
        started = time.monotonic() - self.train_seconds
        try:
            while step < total_steps:
                batches = [collate([train[i] for i in idx], pad_id)
                           for idx in self._micro_batches(step, len(train), perms)]
                n_targets = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
                total = 0.0
                for batch in batches:
                    batch = {k: v.to(device) for k, v in batch.items()}
                    with autocast(device):
                        loss, _ = token_loss(model, batch)
                    (loss / max(n_targets, 1)).backward()
                    total += float(loss.detach())
                    self.tokens_seen += int(batch["attention_mask"].sum())
                torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                self.train_seconds = time.monotonic() - started
                train_loss = total / max(n_targets, 1)
                recent = [*recent[-9:], train_loss]
                self.history.append({"step": step, "loss": round(train_loss, 5),
                                     "lr": scheduler.get_last_lr()[0],
                                     "seconds": round(self.train_seconds, 1)})
                stop = False
                if held and (step % a.eval_every == 0 or step == total_steps):
                    last_eval = mean_loss(model, held, batch_size=a.batch_size, device=device,
                                          pad_id=pad_id)
                    stop = self._record_eval(step, last_eval, model)
                if a.time_budget and self.train_seconds >= a.time_budget * 60:
                    self.stop_reason = f"time budget of {a.time_budget:g} min"
                    stop = True
                if stop or step % save_every == 0:
                    self._save_checkpoint(model, optimizer, scheduler, step, device)
                postfix = {"loss": f"{sum(recent) / len(recent):.3f}",
                           "lr": f"{scheduler.get_last_lr()[0]:.1e}"}
                if last_eval is not None:
                    postfix["eval"] = f"{last_eval:.3f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                if stop:
                    break
        except KeyboardInterrupt:
            # Weights and optimizer are consistent between steps: keep them for --resume.
            optimizer.zero_grad(set_to_none=True)
            if step > max(self.saved_step, 0):
                self._save_checkpoint(model, optimizer, scheduler, step, device)
                print(f"\ninterrupted: checkpoint at step {step}; continue with --resume",
                      file=sys.stderr)
            raise
        finally:
            bar.close()
        return step

    def _record_eval(self, step: int, loss: float, model: Any) -> bool:
        """Log an eval loss, keep the best adapter; True when early stopping says stop."""
        a = self.args
        if self.history and self.history[-1].get("step") == step:
            self.history[-1]["eval_loss"] = round(loss, 5)
        else:
            self.history.append({"step": step, "eval_loss": round(loss, 5)})
        if loss < self.best_loss - a.min_delta:
            self.best_loss, self.best_step, self.bad_evals = loss, step, 0
            best = self.out / "checkpoints" / "best"
            if step > 0:
                self._atomic_dir(best, lambda tmp: model.save_pretrained(tmp / "adapter"))
                (best / "best.json").write_text(json.dumps({"step": step, "eval_loss": loss}))
            return False
        self.bad_evals += 1
        if a.patience and self.bad_evals >= a.patience:
            self.stop_reason = (f"early stopping: no eval-loss gain in {self.bad_evals} evals "
                                f"(best {self.best_loss:.4f} at step {self.best_step})")
            return True
        return False

    # checkpoints ---------------------------------------------------------------------------

    @staticmethod
    def _atomic_dir(target: Path, fill: Any) -> None:
        tmp = target.with_name(f".{target.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        fill(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)

    def _save_checkpoint(self, model: Any, optimizer: Any, scheduler: Any, step: int,
                         device: str) -> None:
        import torch

        state = {
            "step": step, "settings": self.settings, "history": self.history,
            "best_loss": None if math.isinf(self.best_loss) else self.best_loss,
            "best_step": self.best_step, "bad_evals": self.bad_evals,
            "base_eval": self.base_eval, "train_seconds": self.train_seconds,
            "tokens_seen": self.tokens_seen, "stop_reason": self.stop_reason,
        }

        def fill(tmp: Path) -> None:
            model.save_pretrained(tmp / "adapter")
            rng = {"cpu": torch.get_rng_state()}
            if device.startswith("cuda"):
                rng["cuda"] = torch.cuda.get_rng_state()
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": rng}, tmp / "trainer.pt")
            (tmp / "state.json").write_text(json.dumps(state, indent=1))

        root = self.out / "checkpoints"
        self._atomic_dir(root / f"step-{step:06d}", fill)
        self.saved_step = step
        steps = sorted(root.glob("step-*"))
        for old in steps[:-max(self.args.keep_checkpoints, 1)]:
            shutil.rmtree(old)

    @staticmethod
    def _load_adapter(model: Any, folder: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))

    def _checkpoint_to_resume(self) -> tuple[Path, dict[str, Any]]:
        """The checkpoint folder and its state, refused early if its settings differ."""
        a = self.args
        if a.resume == "latest":
            found = sorted((self.out / "checkpoints").glob("step-*"))
            if not found:
                raise DataError(self.out / "checkpoints", 0,
                                "--resume: no checkpoint to continue from")
            folder = found[-1]
        else:
            folder = Path(a.resume)
        if not (folder / "state.json").is_file():
            raise DataError(folder, 0, "--resume: not a checkpoint folder (no state.json)")
        state = json.loads((folder / "state.json").read_text())
        changed = [
            f"{k}: {state['settings'].get(k)!r} -> {self.settings.get(k)!r}"
            for k in _RESUME_KEYS if state["settings"].get(k) != self.settings.get(k)
        ]
        if changed:
            raise DataError(folder, 0, "--resume: the checkpoint was made with other "
                            "settings: " + "; ".join(changed))
        return folder, state

    def _resume(self, model: Any, optimizer: Any, scheduler: Any, device: str,
                folder: Path, state: dict[str, Any]) -> int:
        import torch

        self._load_adapter(model, folder / "adapter")
        saved = torch.load(folder / "trainer.pt", weights_only=False, map_location="cpu")
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"]["cpu"])
        if "cuda" in saved["rng"] and device.startswith("cuda"):
            torch.cuda.set_rng_state(saved["rng"]["cuda"])
        self.history = state["history"]
        self.best_loss = math.inf if state["best_loss"] is None else state["best_loss"]
        self.best_step, self.bad_evals = state["best_step"], state["bad_evals"]
        self.base_eval, self.train_seconds = state["base_eval"], state["train_seconds"]
        self.tokens_seen = state["tokens_seen"]
        self.saved_step = int(state["step"])
        print(f"resumed from {folder} at step {state['step']}", file=sys.stderr)
        return int(state["step"])

    # output --------------------------------------------------------------------------------

    def _export(self, model: Any, tokenizer: Any, base_dir: Path, dataset: Dataset,
                held_ex: list[Example], train: list[Encoded], step: int, used_step: int,
                final_eval: float | None, device: str) -> None:
        import torch

        a = self.args
        adapter_dir, merged_dir = self.out / "adapter", self.out / "merged"
        model.to("cpu")
        self._atomic_dir(adapter_dir, lambda tmp: (model.save_pretrained(tmp),
                                                    tokenizer.save_pretrained(tmp)))
        _point_adapter_at(adapter_dir, base_dir)
        merged = model.merge_and_unload()
        merged.to(getattr(torch, a.merged_dtype))
        merged.config.use_cache = True

        def fill(tmp: Path) -> None:
            merged.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            generation = merged.generation_config
            generation.eos_token_id = tokenizer.eos_token_id
            generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id \
                is not None else tokenizer.eos_token_id
            generation.save_pretrained(tmp)

        self._atomic_dir(merged_dir, fill)
        eval_table = ""
        if a.eval_generate > 0 and held_ex:
            report = evaluate_models(
                [str(base_dir), str(merged_dir)], held_ex[:a.eval_generate],
                labels=["base", "tuned"], system=self.system, device=device,
                data_dir=a.data_dir, batch_size=a.batch_size, max_seq_len=a.max_seq_len)
            eval_table = markdown_table(report)
        metrics = {
            "steps": step, "used_step": used_step, "stop_reason": self.stop_reason,
            "base_eval_loss": self.base_eval, "final_eval_loss": final_eval,
            "best_eval_loss": None if math.isinf(self.best_loss) else self.best_loss,
            "best_step": self.best_step,
            "exported_eval_loss": self.best_loss if used_step == self.best_step != step
            else final_eval,
            "train_seconds": self.train_seconds,
            "tokens_seen": self.tokens_seen, "train_examples": len(train),
            "heldout_examples": len(held_ex), "history": self.history,
        }
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        if _worse(metrics):
            print("warning: the exported weights have a higher held-out loss than the base "
                  "model", file=sys.stderr)
        (self.out / "README.md").write_text(
            model_card(self.settings, dataset, metrics, eval_table, self.out))
        print(f"adapter: {adapter_dir}\nmerged:  {merged_dir}\ncard:    {self.out / 'README.md'}")


def command_line(a: argparse.Namespace) -> str:
    """The run as one explicit command, for the model card."""
    parts = ["supportbot", "finetune", "generator", "--data", *map(str, a.data),
             "--base", a.base, "--out", str(a.out)]
    for flag in ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "lr", "schedule",
                 "warmup_steps", "weight_decay", "batch_size", "grad_accum", "max_seq_len",
                 "epochs", "max_steps", "time_budget", "seed", "eval_split", "eval_every",
                 "eval_examples", "patience", "merged_dtype", "device"):
        value = getattr(a, flag)
        if value is not None:
            parts += [f"--{flag.replace('_', '-')}", f"{value:g}" if isinstance(value, float)
                      else str(value)]
    for flag in ("skip_bad", "redact_pii"):
        if getattr(a, flag):
            parts.append(f"--{flag.replace('_', '-')}")
    if a.system is not None:
        parts += ["--system", a.system]
    return " ".join(shlex.quote(p) for p in parts)


def _point_adapter_at(adapter_dir: Path, base_dir: Path) -> None:
    """The adapter names its base by absolute path, so vLLM and peft find it from anywhere."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = str(base_dir.resolve())
    path.write_text(json.dumps(config, indent=2))


def _worse(metrics: dict) -> bool:
    base, final = metrics["base_eval_loss"], metrics["exported_eval_loss"]
    return base is not None and final is not None and final > base


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ppl(x: float | None) -> str:
    return "-" if x is None else f"{math.exp(x):.2f}"


def model_card(settings: dict, dataset: Dataset, metrics: dict, eval_table: str,
               out: Path) -> str:
    """The README.md of the output folder: what was trained on what, how, and how well."""
    held = out / "heldout.jsonl"
    held_sha = hashlib.sha256(held.read_bytes()).hexdigest() if held.exists() else "-"
    train_losses = [h["loss"] for h in metrics["history"] if "loss" in h]
    tail = train_losses[-10:]
    final_train = sum(tail) / len(tail) if tail else None
    lines = [
        "# supportbot reply generator: LoRA fine-tune",
        "",
        f"Base model: `{settings['base_spec']}` (`{settings['base']}`). "
        f"Trained with `supportbot finetune generator`; loss on assistant turns only.",
        "",
        "## Data",
        "",
        "| file | format | sha256 | rows | examples | skipped |",
        "|---|---|---|---|---|---|",
    ]
    for f in dataset.files:
        skipped = ", ".join(f"{k}: {v}" for k, v in f.skipped.items()) or "-"
        lines.append(f"| `{f.path}` | {f.format} | `{f.sha256}` | {f.rows} | {f.examples} | "
                     f"{skipped} |")
    lines += [
        "",
        f"Duplicates dropped: {dataset.duplicates}. Train examples: "
        f"{metrics['train_examples']}; held-out: {metrics['heldout_examples']} "
        f"(`heldout.jsonl`, sha256 `{held_sha}`), {settings['eval_split']:g} of each intent "
        f"by content hash with seed {settings['seed']}.",
        "",
        "## Parameters",
        "",
        "| parameter | value |",
        "|---|---|",
    ]
    for key in ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "lr", "schedule",
                "warmup_steps", "weight_decay", "max_grad_norm", "batch_size", "grad_accum",
                "max_seq_len", "epochs", "max_steps", "total_steps", "eval_every",
                "eval_examples", "patience", "min_delta", "time_budget_min", "seed",
                "skip_bad", "redact_pii", "merged_dtype"):
        value = settings[key]
        if isinstance(value, list):
            value = ",".join(map(str, value))
        lines.append(f"| {key} | {value} |")
    lines += [
        f"| system prompt | {settings['system'] or '(the template default)'} |",
        "",
        "## Training",
        "",
        f"- steps: {metrics['steps']} of {settings['total_steps']} ({metrics['stop_reason']}); "
        f"weights exported from step {metrics['used_step']}",
        f"- wall time of the training loop (evals included): "
        f"{metrics['train_seconds'] / 60:.1f} min; tokens seen (prompt and reply): "
        f"{metrics['tokens_seen']}",
        f"- final train loss (mean of the last {len(tail)} steps): {_fmt(final_train)}",
        f"- eval loss: base {_fmt(metrics['base_eval_loss'])}, final "
        f"{_fmt(metrics['final_eval_loss'])}, best {_fmt(metrics['best_eval_loss'])} "
        f"at step {metrics['best_step']}",
        *(["- **warning: the exported weights have a higher held-out loss than the base "
           "model**"] if _worse(metrics) else []),
        "",
        "## Evaluation (held-out, assistant tokens)",
        "",
        "| model | eval loss | perplexity |",
        "|---|---|---|",
        f"| base | {_fmt(metrics['base_eval_loss'])} | {_ppl(metrics['base_eval_loss'])} |",
    ]
    tuned = metrics["exported_eval_loss"]
    lines.append(f"| tuned | {_fmt(tuned)} | {_ppl(tuned)} |")
    if eval_table:
        lines += ["", "Reply quality (`supportbot eval generator`):", "", eval_table]
    lines += [
        "",
        "## Serving",
        "",
        "```",
        "vllm serve merged/",
        f"vllm serve {settings['base']} --enable-lora --max-lora-rank "
        f"{max(8, settings['lora_r'])} --lora-modules supportbot=adapter/",
        "```",
        "",
        "The bot's embedded backend loads `merged/` too (`[generator] model = \"<out>/merged\"`).",
        "",
        "## Reproduce",
        "",
        "```",
        settings["command"],
        "```",
        "",
    ]
    return "\n".join(lines)


run_module(__name__)
