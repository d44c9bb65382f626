"""Held-out evaluation during training (trainer/evaluation.py): it never changes training (bit-identical losses and
weights, dropout on, resumed or not), its loss and bits per byte equal an independent computation, 2 ranks report
what 1 process does, and --eval_split never trains on the rows it holds out."""

import json
import math
import random

import pytest
import torch
from helpers import load_script, max_weight_diff, tiny_args, torchrun_2, write_jsonl

from model import MicroLMConfig, MicroLMForCausalLM
from trainer.evaluation import Rows, split_rows, token_byte_lengths

pretrain = load_script("1-pretrain.py")
sft = load_script("2-sft.py")
dpo = load_script("4-RLHF.py")


def _texts(n, seed):
    rng = random.Random(seed)
    words = ["北京", "巴黎", "The cat", "小明", " likes fish.", "是一个城市。", " runs fast.", "每天学习。"]
    return [{"text": "".join(rng.choice(words) for _ in range(rng.randint(4, 14)))} for _ in range(n)]


def _chats(n, seed):
    rng = random.Random(seed)
    return [{"conversations": [{"role": "user", "content": f"{a}加{b}等于多少？"},
                               {"role": "assistant", "content": f"{a}加{b}等于{a + b}。" + "好。" * rng.randint(0, 4)}]}
            for a, b in ((rng.randint(0, 30), rng.randint(0, 30)) for _ in range(n))]


@pytest.fixture
def with_dropout(monkeypatch):
    """Dropout on, so any random number evaluation took from the training stream would change the losses."""
    original = MicroLMConfig.from_preset.__func__
    monkeypatch.setattr(MicroLMConfig, "from_preset",
                        classmethod(lambda cls, name, **kw: original(cls, name, **{"dropout": 0.1, **kw})))


def _history(folder):
    return json.loads((folder / "resume" / "state.json").read_text())


@pytest.mark.e2e
def test_evaluation_leaves_training_bit_identical_and_resumes_exactly(tmp_path, with_dropout):
    train = write_jsonl(tmp_path / "train.jsonl", _texts(200, 0))
    held = write_jsonl(tmp_path / "held.jsonl", _texts(40, 1))
    common = ("--max_seq_len", 32, "--batch_size", 4, "--max_steps", 8, "--save_interval", 100,
              "--learning_rate", 1e-3)
    plain = pretrain.main(tiny_args(tmp_path / "plain", train, *common))
    evaluated = pretrain.main(tiny_args(tmp_path / "eval", train, *common, "--eval_data", held,
                                        "--eval_interval", 3, "--eval_batches", 2))
    assert [v for _, v in evaluated["history"]] == [v for _, v in plain["history"]]  # bit for bit
    assert max_weight_diff(tmp_path / "plain/out/pretrain", tmp_path / "eval/out/pretrain") == 0
    steps = [s for s, _ in evaluated["eval_history"]]
    assert steps == [0, 3, 6, 8]  # at the start, every 3 steps and at the end; 31 targets per 32-token row
    losses = [e["loss"] for _, e in evaluated["eval_history"]]
    assert losses[-1] < losses[0] and all(e["tokens"] == 2 * 4 * 31 for _, e in evaluated["eval_history"])

    pretrain.main(tiny_args(tmp_path / "cut", train, *common, "--eval_data", held, "--eval_interval", 3,
                            "--eval_batches", 2, "--stop_at_step", 4))
    resumed = pretrain.main(tiny_args(tmp_path / "cut", train, *common, "--eval_data", held, "--eval_interval", 3,
                                      "--eval_batches", 2, "--resume"))
    assert max_weight_diff(tmp_path / "cut/out/pretrain", tmp_path / "eval/out/pretrain") == 0
    assert resumed["eval_history"] == evaluated["eval_history"]
    assert [v for _, v in resumed["history"]] == [v for _, v in plain["history"]]


def test_held_out_loss_and_bits_per_byte_equal_an_independent_computation(tmp_path, tokenizer):
    from dataset import SFTDataset

    train = write_jsonl(tmp_path / "train.jsonl", _chats(48, 0))
    held = write_jsonl(tmp_path / "held.jsonl", _chats(12, 1))
    result = sft.main(tiny_args(tmp_path, train, "--from", "none", "--max_seq_len", 64, "--batch_size", 4,
                                "--max_steps", 3, "--eval_data", held, "--eval_batches", 0, "--empty_think_ratio", 0))
    reported = result["eval"]
    model = MicroLMForCausalLM.from_pretrained(tmp_path / "out/sft").eval()
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    nats = text_nats = 0.0
    count, text_ids = 0, []
    for row in SFTDataset(held, tokenizer, 64, empty_think_ratio=0.0):  # one row at a time, no padding
        ids, labels = row["input_ids"][None], row["labels"][None]
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
        for pos, target in enumerate(labels[0, 1:].tolist()):
            if target != -100:
                nats -= logp[pos, target].item()
                count += 1
                if target not in special:
                    text_nats -= logp[pos, target].item()
                    text_ids.append(target)
    text_bytes = len(tokenizer.decode(text_ids).encode("utf-8"))  # the labelled text, decoded in one piece
    assert reported["tokens"] == count
    assert reported["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert reported["bpb"] == pytest.approx(text_nats / math.log(2) / text_bytes, rel=1e-5)
    # the report card carries the run's facts: data, rows, steps, the final training and held-out figures
    entry, = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (entry["kind"], entry["stage"], entry["rows"], entry["steps"]) == ("stage", "sft", 48, 3)
    assert entry["eval_bpb"] == reported["bpb"] and entry["train_loss"] == result["last_loss"]
    assert entry["tokens"] == result["tokens"] and entry["data"] == str(train)
    assert "| sft | train.jsonl | 48 | 3 |" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "images" / "report.png").stat().st_size > 5000


def test_token_byte_lengths_count_utf8_bytes_and_zero_for_special_tokens(tokenizer):
    lengths = token_byte_lengths(tokenizer, vocab_size=len(tokenizer) + 5)
    assert lengths.numel() == len(tokenizer) + 5 and lengths[len(tokenizer):].eq(0).all()
    assert lengths[tokenizer.eos_token_id] == 0
    text = "训练一个小模型 costs €3."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))


@pytest.mark.e2e
def test_two_ranks_report_what_one_process_does_and_draw_their_own_dropout(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", _texts(200, 0))
    held = write_jsonl(tmp_path / "held.jsonl", _texts(60, 1))
    common = ["--max_seq_len", "32", "--max_steps", "2", "--save_interval", "100", "--eval_data", str(held),
              "--eval_batches", "3"]
    torchrun_2("1-pretrain.py", tiny_args(tmp_path / "ddp", train, *common, "--batch_size", "2"))
    single = pretrain.main(tiny_args(tmp_path / "single", train, *common, "--batch_size", "4"))
    ddp = _history(tmp_path / "ddp/out/pretrain")["eval_history"]
    assert [s for s, _ in ddp] == [s for s, _ in single["eval_history"]]
    for (_, a), (_, b) in zip(ddp, single["eval_history"]):
        assert a["tokens"] == b["tokens"] == 3 * 4 * 31
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["bpb"] == pytest.approx(b["bpb"], rel=1e-5)
    rng = [torch.load(tmp_path / f"ddp/out/pretrain/resume/rng_rank{r}.pt", weights_only=True)["torch"]
           for r in (0, 1)]
    assert not torch.equal(rng[0], rng[1])  # each rank its own dropout / sampling stream


def test_eval_split_holds_out_rows_that_are_never_trained_on(tmp_path, monkeypatch):
    train_rows, held_rows = split_rows(100, 0.1, seed=7)
    assert len(held_rows) == 10 and not set(train_rows) & set(held_rows)
    assert sorted(train_rows + held_rows) == list(range(100)) and split_rows(100, 0.1, seed=7)[1] == held_rows
    rows = Rows(list(range(100)), held_rows)
    assert [rows[i] for i in range(len(rows))] == held_rows

    data = write_jsonl(tmp_path / "sft.jsonl", _chats(40, 0))
    seen = []
    original = sft.SFTDataset.__getitem__
    monkeypatch.setattr(sft.SFTDataset, "__getitem__", lambda self, i: seen.append(i) or original(self, i))
    result = sft.main(tiny_args(tmp_path, data, "--from", "none", "--max_seq_len", 64, "--batch_size", 4,
                                "--epochs", 1, "--eval_split", 0.25, "--eval_batches", 0, "--eval_interval", 100))
    _, held = split_rows(40, 0.25, seed=42)
    evaluations = len(result["eval_history"])
    assert evaluations == 2 and result["steps"] == 30 // 4
    trained = [i for i in seen if i not in held]
    assert len(trained) == result["steps"] * 4 and not set(trained) & set(held)
    assert sorted(i for i in seen if i in held) == sorted(held * evaluations)  # held rows only in evaluations


def test_dpo_reports_its_held_out_loss_and_reward_accuracy(tmp_path):
    from helpers import ROOT

    demo = ROOT / "demo" / "data" / "dpo.jsonl"
    result = dpo.main(tiny_args(tmp_path, demo, "--from", "none", "--max_seq_len", 64, "--batch_size", 4,
                                "--max_steps", 2, "--eval_split", 0.1, "--eval_batches", 2))
    last = result["eval"]
    assert last["tokens"] == 2 * 4 and 0 <= last["accuracy"] <= 1 and math.isfinite(last["loss"])
    assert "bpb" not in last  # a pair-level loss has no bits per byte
