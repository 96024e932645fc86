"""Fine-tuning the reply generator: data readers, loss mask, a real LoRA run, resume, eval.

The data are hand-written fixtures in the Bitext, TwACS and JSONL formats; the model is
the real embedded SmolLM2 (converted once into the shared model cache), trained for a few
steps on CPU with one thread so the test stays short on shared cores.
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from finetune import causal_lm, eval_generator, generator
from finetune.conversations import (
    DataError,
    Example,
    Turn,
    clean_tweet,
    load,
    read_file,
    redact_pii,
    sha256_file,
    split,
)
from tests.conftest import DATA_DIR

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "finetune"
BITEXT = FIXTURES / "bitext_small.csv"
TWACS = FIXTURES / "twacs_small.csv"
JSONL = FIXTURES / "conversations.jsonl"
ALL = [BITEXT, TWACS, JSONL]


# --- readers -------------------------------------------------------------------------------


def test_bitext_rows_become_single_exchanges_with_their_line_and_intent() -> None:
    examples, stats = read_file(BITEXT)
    assert (stats.format, stats.rows, stats.examples) == ("bitext", 24, 24)
    first, multiline, after = examples[0], examples[1], examples[2]
    assert [t.role for t in first.turns] == ["user", "assistant"]
    assert first.turns[0].content == "how do I cancel order 10023?"
    assert first.group == "cancel_order"
    assert multiline.turns[1].content.count("\n") == 2
    # The record on lines 3-5 spans three lines, so the next one starts on line 6.
    assert (first.source, multiline.source, after.source) == (
        f"{BITEXT}:2", f"{BITEXT}:3", f"{BITEXT}:6")


def test_twacs_threads_lose_signatures_handles_links_and_split_markers() -> None:
    examples, stats = read_file(TWACS)
    assert stats.format == "twacs"
    assert stats.skipped == {"no agent reply": 1, "empty row": 1}
    by_id = {e.id: e for e in examples}
    assert [(t.role, t.content) for t in by_id["1001"].turns] == [
        ("user", "my flight 123 to Boston got cancelled, what now?"),
        ("assistant", "So sorry about that! We have rebooked you on the 6pm flight, "
                      "check your email."),
        ("user", "thanks, that works"),
        ("assistant", "Happy to help, safe travels!"),
    ]
    assert by_id["1002"].turns[0].content == "why is DL455 delayed again??"
    assert by_id["1002"].turns[1].content.endswith("We expect to leave at 7:40.")
    assert by_id["1003"].turns[0].content == "my bag never arrived in Denver"
    assert by_id["1003"].turns[1].content == (
        "I'm sorry your bag did not make it. Please file a report at the baggage office so "
        "we can... trace it and deliver it to your address.")
    assert by_id["1004"].turns[0].content == "love the new seats & the free wifi!"
    assert by_id["1004"].turns[1].content == "We love to hear that! Thanks for flying with us. 😊"
    # A thread that ends with the customer keeps the part up to the last agent reply.
    assert by_id["1006"].turns[-1].role == "assistant"
    assert by_id["1006"].turns[-1].content.endswith("we'll check it in for you.")
    assert by_id["1008"].turns[1].content.endswith("A fare difference may apply.")
    text = json.dumps([e.to_json() for e in examples])
    for leftover in ("__cust__", "__company__", "@44120", "http", "*TMT", "^JD", "-Sara",
                     "^Helen", "^Jo", "*HKC", "1/2", "2/2", "(1/1)"):
        assert leftover not in text


def test_twacs_reads_the_bz2_file_as_published(tmp_path: Path) -> None:
    packed = tmp_path / "airlines_dev.csv.bz2"
    packed.write_bytes(bz2.compress(TWACS.read_bytes()))
    plain, _ = read_file(TWACS)
    compressed, stats = read_file(packed)
    assert stats.format == "twacs"
    assert [e.turns for e in compressed] == [e.turns for e in plain]


@pytest.mark.parametrize(("raw", "clean"), [
    ("__cust__  Thanks a lot! *TMT", "Thanks a lot!"),
    ("__cust__  Have a great flight. ^JD", "Have a great flight."),
    ("__cust__  Please call us at 800-225-2525. -Sara", "Please call us at 800-225-2525."),
    ("__cust__  We are on it.^Jo", "We are on it."),
    ("__cust__  Available 24/7. ^Al.", "Available 24/7."),
    ("__cust__  we are so sorry for the... 1/2^LW", "we are so sorry for the..."),
    ("@824 Good morning, Mark! https://t.co/x1 😊 *HKC", "Good morning, Mark! 😊"),
])
def test_agent_tweets_are_cleaned(raw: str, clean: str) -> None:
    assert clean_tweet(raw, agent=True) == clean


def test_customer_tweets_keep_their_ending() -> None:
    assert clean_tweet("__company__  my bag is lost -Jo", agent=False) == "my bag is lost -Jo"


def test_jsonl_export_keeps_context_turns_and_authors() -> None:
    examples, stats = read_file(JSONL)
    assert (stats.format, stats.rows, stats.examples) == ("jsonl", 5, 5)
    refund = examples[0]
    assert [(t.role, t.train, t.author) for t in refund.turns] == [
        ("user", True, ""), ("assistant", False, "bot"),
        ("user", True, ""), ("assistant", True, "operator")]
    assert examples[2].turns[0] == Turn("system", "You are the support assistant of a shoe shop.")
    # Line 4 is blank; the trailing customer turn of line 5 is dropped.
    assert examples[3].source == f"{JSONL}:5"
    assert examples[3].turns[-1].role == "assistant"
    assert examples[4].id == "42"
    assert Example(refund.turns, "x").to_json()["messages"][1] == {
        "role": "assistant", "content": refund.turns[1].content, "train": False,
        "author": "bot"}


BAD_ROW = 'customer support,virtual assistant,hello,greet,,,,,X,B,""\n'
_HEADER = ("context,role,instruction,intent,entity_type,entity_value,start_offset,end_offset,"
           "category,tags,response\n")


@pytest.mark.parametrize(("name", "text", "where", "problem"), [
    ("bad.jsonl", '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                  '"content": "hello"}]}\n{"messages": [\n', 2, "malformed JSON"),
    ("bad.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', 1,
     "no assistant turn to learn from"),
    ("bad.jsonl", '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                  '"content": "yo", "train": false}]}\n', 1, "no assistant turn to learn from"),
    ("bad.jsonl", '{"messages": [{"role": "agent", "content": "hi"}]}\n', 1,
     "messages[0].role is 'agent'"),
    ("bad.jsonl", '{"messages": [{"role": "user", "contnet": "hi"}]}\n', 1,
     "unknown key(s) contnet"),
    ("bad.jsonl", '\n\n{"messages": [{"role": "assistant", "content": "hi"}]}\n', 3,
     "must start with a user message"),
    ("empty.jsonl", "", 1, "empty file"),
    ("empty.csv", "", 1, "empty file"),
    ("cols.csv", "question,answer\nhi,hello\n", 1, "unknown CSV columns question, answer"),
    ("bitext.csv", _HEADER + BITEXT.read_text().splitlines(keepends=True)[1] + BAD_ROW, 3,
     "empty response (no assistant turn)"),
    ("bitext.csv", _HEADER + "customer support,virtual assistant,hi\n", 2,
     "3 fields, the header has 11"),
    ("twacs.csv", "first_tweet_id,tag,first_utterance,context\n"
                  '1,UNK,<cust__ hi __cust>,"<rep__ hello __cust>"\n', 2,
     "turn opened as <rep__ but closed as __cust>"),
    ("twacs.csv", "first_tweet_id,tag,first_utterance,context\n"
                  "1,UNK,just text,\n", 2, "text outside a turn"),
])
def test_bad_data_names_file_line_and_problem(
    tmp_path: Path, name: str, text: str, where: int, problem: str
) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load([path])
    assert str(info.value).startswith(f"{path}:{where}: ")
    assert problem in str(info.value)


def test_skip_bad_counts_instead_of_stopping(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    good = JSONL.read_text().splitlines()[1]
    path.write_text(f"{good}\nnot json\n{{\"messages\": []}}\n", encoding="utf-8")
    dataset = load([path], skip_bad=True)
    assert len(dataset.examples) == 1
    assert dataset.files[0].skipped == {"bad: malformed JSON": 1, 'bad: no "messages" list': 1}


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.csv: no such file"):
        load([tmp_path / "nope.csv"])


def test_duplicates_across_files_are_dropped_once() -> None:
    dataset = load([BITEXT, BITEXT, JSONL])
    assert len(dataset.examples) == 29
    assert dataset.duplicates == 24
    first, second, _ = dataset.files
    assert first.sha256 == second.sha256


def test_split_is_by_hash_stratified_and_independent_of_order() -> None:
    examples = list(load([BITEXT]).examples)
    train, held = split(examples, 0.2, seed=13)
    assert len(train) + len(held) == 24
    # Eight intents of three examples each: one of each is held out.
    assert sorted(e.group for e in held) == sorted({e.group for e in examples})
    _, held2 = split(list(reversed(examples)), 0.2, seed=13)
    assert [e.key for e in held2] == [e.key for e in held]
    assert [e.key for e in split(examples, 0.2, seed=14)[1]] != [e.key for e in held]


@pytest.mark.parametrize(("text", "redacted"), [
    ("mail me at jane.doe+x@example.co.uk", "mail me at {{Email}}"),
    ("call +1 (415) 555-0132 today", "call {{Phone Number}} today"),
    ("card 4111 1111 1111 1111 charged", "card {{Card Number}} charged"),
    ("card 4111 1111 1111 1112 is not a card", "card {{Phone Number}} 1112 is not a card"),
    ("order number AB12345 and purchase 113542617735902",
     "order number {{Order Number}} and purchase {{Order Number}}"),
    ("ticket #88231 is open", "ticket {{Order Number}} is open"),
    ("flight DL4047 on 2017-12-01 at 10.30", "flight DL4047 on 2017-12-01 at 10.30"),
    ("order status please", "order status please"),
])
def test_pii_redaction(text: str, redacted: str) -> None:
    assert redact_pii(text) == redacted


# --- loss mask -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_dir() -> Path:
    return causal_lm.resolve_base("smollm2", DATA_DIR)


@pytest.fixture(scope="module")
def tokenizer(base_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


def _target_text(enc: causal_lm.Encoded, tokenizer: Any) -> list[str]:
    """The trained stretches of an encoded example, decoded."""
    runs: list[list[int]] = []
    previous = False
    for tok, label in zip(enc.input_ids, enc.labels, strict=True):
        on = label != causal_lm.IGNORE
        if on and not previous:
            runs.append([])
        if on:
            runs[-1].append(tok)
        previous = on
    return [tokenizer.decode(run) for run in runs]


def test_loss_covers_trainable_assistant_turns_only(tokenizer: Any) -> None:
    refund = read_file(JSONL)[0][0]
    enc = causal_lm.encode(refund, tokenizer, system="Be brief.", max_len=512)
    assert enc is not None
    targets = _target_text(enc, tokenizer)
    operator = refund.turns[3].content
    assert targets == [f"{operator}<|im_end|>"]
    whole = tokenizer.decode(enc.input_ids)
    assert "Be brief." in whole and refund.turns[1].content in whole  # context, not target


def test_every_assistant_turn_of_a_thread_is_a_target(tokenizer: Any) -> None:
    thread = next(e for e in read_file(TWACS)[0] if e.id == "1001")
    enc = causal_lm.encode(thread, tokenizer, system="", max_len=512)
    assert enc is not None
    assert _target_text(enc, tokenizer) == [
        f"{thread.turns[1].content}<|im_end|>", f"{thread.turns[3].content}<|im_end|>"]


def test_long_conversations_drop_oldest_exchanges_first(tokenizer: Any) -> None:
    thread = next(e for e in read_file(TWACS)[0] if e.id == "1001")
    full = causal_lm.encode(thread, tokenizer, system="", max_len=512)
    assert full is not None
    short = causal_lm.encode(thread, tokenizer, system="", max_len=len(full.input_ids) - 1)
    assert short is not None
    text = tokenizer.decode(short.input_ids)
    assert thread.turns[0].content not in text
    assert _target_text(short, tokenizer) == [f"{thread.turns[3].content}<|im_end|>"]


def test_token_loss_matches_the_model_loss(base_dir: Path, tokenizer: Any) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    encoded, _ = causal_lm.encode_all(read_file(JSONL)[0][:3], tokenizer, system="",
                                      max_len=128)
    batch = causal_lm.collate(encoded, tokenizer.pad_token_id)
    with torch.no_grad():
        total, n = causal_lm.token_loss(model, batch)
        reference = model(**batch).loss
    assert n == sum(e.n_targets for e in encoded)
    assert float(total) / n == pytest.approx(float(reference), rel=1e-4)


# --- a real fine-tune ----------------------------------------------------------------------


def _args(module: Any, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.configure(parser)
    return parser.parse_args(argv)


def _train_argv(out: Path, *extra: str) -> list[str]:
    return ["--data", *map(str, ALL), "--out", str(out), "--data-dir", str(DATA_DIR),
            "--max-steps", "4", "--batch-size", "2", "--max-seq-len", "128",
            "--eval-every", "2", "--eval-split", "0.2", "--eval-examples", "6",
            "--device", "cpu", "--threads", "1", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real 4-step run shared by the tests below; its stderr is kept to inspect."""
    import torch

    out = tmp_path_factory.mktemp("finetune") / "run"
    capture = tmp_path_factory.mktemp("stderr") / "stderr.txt"
    threads = torch.get_num_threads()
    try:
        with capture.open("w") as err, contextlib.redirect_stderr(err):
            code = generator.run(_args(generator, _train_argv(out)))
    finally:
        torch.set_num_threads(threads)
    assert code == 0, capture.read_text()[-2000:]
    return {"out": out, "stderr": capture.read_text()}


def test_training_writes_adapter_merged_model_and_card(trained: dict[str, Any]) -> None:
    out: Path = trained["out"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / "adapter" / name).is_file()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
                 "chat_template.jinja"):
        assert (out / "merged" / name).is_file()
    config = json.loads((out / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]).is_absolute()
    assert adapter["r"] == 16
    card = (out / "README.md").read_text()
    for path in ALL:
        assert f"| `{path}` |" in card and sha256_file(path) in card
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4
    assert f"| base | {metrics['base_eval_loss']:.4f} |" in card
    assert "| tuned |" in card and "vllm serve merged/" in card
    assert [h["step"] for h in metrics["history"] if "eval_loss" in h] == [0, 2, 4]
    held = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert len(held) == metrics["heldout_examples"] > 0


def test_progress_bar_shows_eta_and_live_loss(trained: dict[str, Any]) -> None:
    err = trained["stderr"]
    assert "finetune:" in err and "4/4" in err
    assert "loss=" in err and "eval=" in err and "<" in err  # elapsed<remaining


def test_merged_folder_loads_with_plain_transformers_and_answers(
    trained: dict[str, Any], base_dir: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = trained["out"] / "merged"
    tok = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "where is my package"}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert reply.strip()
    # The adapter on its base predicts what the merged model predicts.
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, trained["out"] / "adapter").eval()
    with torch.no_grad():
        a = tuned(**ids).logits[0, -1]
        b = model(**ids).logits[0, -1]
    assert int(a.argmax()) == int(b.argmax())
    assert torch.allclose(a, b, atol=0.5)


def test_resume_continues_exactly_where_the_checkpoint_stopped(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    first = trained["out"]
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(first / "checkpoints" / "step-000002", out / "checkpoints" / "step-000002")
    threads = torch.get_num_threads()
    try:
        code = generator.run(_args(generator, [*_train_argv(out), "--resume", "--no-progress"]))
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    straight = load_file(first / "checkpoints" / "step-000004" / "adapter" /
                         "adapter_model.safetensors")
    resumed = load_file(out / "checkpoints" / "step-000004" / "adapter" /
                        "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for key, value in straight.items():
        assert torch.allclose(value, resumed[key], atol=1e-6), key
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]


def test_resume_refuses_other_settings(
    trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "other"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(trained["out"] / "checkpoints" / "step-000002",
                    out / "checkpoints" / "step-000002")
    code = generator.run(_args(generator, [*_train_argv(out), "--resume", "--lr", "1e-3"]))
    assert code == 2
    assert "lr: 0.0002 -> 0.001" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "reason"), [
    (["--lr", "0.5", "--eval-every", "1", "--patience", "1"], "early stopping"),
    (["--time-budget", "0.0001"], "time budget"),
])
def test_runs_stop_early_and_say_why(tmp_path: Path, extra: list[str], reason: str) -> None:
    import torch

    out = tmp_path / "short"
    threads = torch.get_num_threads()
    try:
        code = generator.run(_args(generator, [*_train_argv(out), *extra, "--no-progress"]))
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 1
    assert metrics["stop_reason"].startswith(reason)
    assert f"steps: 1 of 4 ({reason}" in (out / "README.md").read_text()
    assert (out / "merged" / "model.safetensors").is_file()


def test_cli_errors_name_the_problem(
    tmp_path: Path, trained: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.jsonl"
    assert generator.run(_args(generator, ["--data", str(missing), "--out",
                                           str(tmp_path / "x")])) == 2
    assert f"error: {missing}: no such file" in capsys.readouterr().err
    assert generator.run(_args(generator, _train_argv(trained["out"]))) == 2
    assert "use --resume to continue it" in capsys.readouterr().err


# --- evaluation ----------------------------------------------------------------------------


def test_rouge_l_and_degeneration() -> None:
    assert eval_generator.rouge_l("the cat sat", "the cat sat") == 1.0
    assert eval_generator.rouge_l("", "the cat") == 0.0
    # LCS "a c" of 3 and 4 words: P=2/3, R=2/4.
    assert eval_generator.rouge_l("a b c", "a x c y") == pytest.approx(2 * (2 / 3) * 0.5 /
                                                                        (2 / 3 + 0.5))
    assert eval_generator.words("Open {{Order History}} now") == ["open", "{{order history}}",
                                                                   "now"]
    loop = "I am sorry about that. " * 3
    assert eval_generator.degenerate(loop)
    assert not eval_generator.degenerate("I am sorry about that. It will not happen again.")


def test_eval_compares_base_and_tuned_in_one_table(
    trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    out = trained["out"]
    threads = torch.get_num_threads()
    try:
        code = eval_generator.run(_args(eval_generator, [
            "--model", str(out), "--data", str(out / "heldout.jsonl"), "--limit", "2",
            "--max-new-tokens", "12", "--device", "cpu", "--threads", "1",
            "--data-dir", str(DATA_DIR), "--json", str(tmp_path / "eval.json"),
            "--examples", "2"]))
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    text = capsys.readouterr().out
    assert "| base (smollm2) |" in text and f"| {out.name} |" in text
    assert "| reference replies |" in text and "### Example 2" in text
    report = json.loads((tmp_path / "eval.json").read_text())
    assert [m["label"] for m in report["models"]] == ["base (smollm2)", out.name]
    for m in report["models"]:
        assert len(m["replies"]) == 2 and m["loss"] > 0 and 0 <= m["rouge_l"] <= 1
