"""scripts/bench_quality.py: every held-out token is scored once, the modes train on the same compute, and a saved
checkpoint scores as the model it holds."""

import json
import random
import re
from types import SimpleNamespace

import pytest
import torch
from helpers import make_model, write_jsonl

from scripts import bench_quality as bq


class ContextFree(torch.nn.Module):
    """A causal LM whose next-token distribution ignores the context: log-probabilities `logp` at every position."""

    def __init__(self, logp):
        super().__init__()
        self.logp = torch.nn.Parameter(logp.clone())

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=self.logp.expand(*input_ids.shape, -1))


def _rows(n, seed, most=40):
    rng = random.Random(seed)
    words = ["北京", "是一个城市。", "The cat", " likes to sleep.", "小明", "每天学习。", " runs fast.", "\n"]
    return [{"text": "".join(rng.choice(words) for _ in range(rng.randint(2, most)))} for _ in range(n)]


def test_cut_and_merge_keeps_all_text_in_pieces_of_the_size_asked():
    docs = ["短行\n" * 30 + "x" * 250 + "\n尾巴", "one line only", "a\n\nb"]
    pieces = bq.cut_and_merge(docs, 64)
    assert all(len(p) <= 64 for p in pieces)
    assert re.sub(r"\s", "", "".join(pieces)) == re.sub(r"\s", "", "".join(docs))
    assert len(pieces) < sum(d.count("\n") + 1 for d in docs)  # short lines were merged


def test_windows_score_every_token_once_and_the_unigram_level_is_a_frequency_model(tokenizer):
    text = "".join(r["text"] for r in _rows(30, 1))
    train_ids = torch.randint(3, 200, (5000,), generator=torch.Generator().manual_seed(0)).tolist()
    counts = torch.bincount(torch.tensor(train_ids), minlength=len(tokenizer)).double() + 1
    model = ContextFree((counts / counts.sum()).log().float())
    n_ids = len(bq.text_ids(tokenizer, text))
    assert n_ids > 3 * 16  # several windows
    expected = bq.unigram_bpb(tokenizer, train_ids, text)
    for seq_len in (16, 37, n_ids + 5):  # however the text is cut, each token counts once
        assert abs(bq.bits_per_byte(model, tokenizer, text, seq_len, batch_size=3) - expected) < 1e-4


@pytest.mark.slow
def test_modes_share_compute_learn_and_a_saved_checkpoint_scores_as_itself(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", _rows(400, 2, most=8))  # short texts: padded rows are mostly padding
    held = write_jsonl(tmp_path / "held.jsonl", _rows(20, 3))
    common = ["--data", str(train), "--eval_data", str(held), "--preset", "tiny", "--seq_len", "32",
              "--batch_size", "4", "--device", "cpu", "--work_dir", str(tmp_path / "work")]
    result = bq.main(common + ["--modes", "baseline,packed,doc_mask", "--steps", "40", "--evals", "2",
                               "--learning_rate", "3e-3", "--json", str(tmp_path / "q.json"),
                               "--figure", str(tmp_path / "q.png")])
    assert (tmp_path / "q.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "q.json").read_text())["sets"] == ["held"]
    runs = {r["mode"]: r for r in result["runs"]}
    assert set(runs) == {"baseline", "packed", "doc_mask"}
    steps = [[p["step"] for p in r["curve"]] for r in runs.values()]
    assert steps == [[0, 20, 40]] * 3
    flops = {r["mode"]: [p["flops"] for p in r["curve"]] for r in runs.values()}
    assert flops["baseline"] == flops["packed"] == flops["doc_mask"]  # same compute at every point
    assert runs["packed"]["curve"][-1]["real_tokens"] > 1.5 * runs["baseline"]["curve"][-1]["real_tokens"]
    for r in runs.values():  # every mode learned something
        assert r["curve"][-1]["held"] < r["curve"][0]["held"] - 0.3

    folder = tmp_path / "ckpt"
    model = make_model("tiny", seed=5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    scored = bq.main(common + ["--modes", "", "--score", f"{folder}@1.5e12", "--json", str(tmp_path / "s.json")])
    point = scored["scored"][0]
    text = json.loads((tmp_path / "s.json").read_text())
    assert point["flops"] == 1.5e12 and text["scored"][0]["held"] == point["held"]
    held_text = "\n".join(r["text"] for r in _rows(20, 3))
    assert abs(point["held"] - bq.bits_per_byte(model, tokenizer, held_text, 32)) < 1e-6
