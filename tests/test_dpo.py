"""Stage 4, DPO: summed reply log-probs independent of padding, precomputed reference == on-the-fly, preference
accuracy rises on held-out demo pairs, every trainable parameter moves."""

import pytest
import torch
from helpers import ROOT, load_script, make_model, max_weight_diff, tiny_args, torchrun_2, write_jsonl

from trainer import dpo as dpo_method
from safetensors.torch import load_file

from dataset import DPODataset, dpo_collate, read_jsonl
from demo import metrics
from model import MicroLMForCausalLM

dpo = load_script("4-RLHF.py")
pretrain = load_script("1-pretrain.py")
DEMO = ROOT / "demo" / "data"


def _pair(prompt, chosen, rejected):
    return {"chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}],
            "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": rejected}]}


@pytest.fixture
def base(tmp_path):
    pretrain.main(tiny_args(tmp_path, DEMO / "pretrain_eval.jsonl", "--max_steps", 2, "--max_seq_len", 32,
                            "--batch_size", 2))
    return tmp_path / "out" / "pretrain"


def test_reply_logps_are_sums_that_do_not_depend_on_padding(tmp_path, tokenizer):
    rows = [_pair("3加5等于几？", "3加5等于8。", "不知道。"),
            _pair("Tell me a long story about the cat and the dog please", "Once upon a time " * 8, "No.")]
    data = DPODataset(write_jsonl(tmp_path / "dpo.jsonl", rows), tokenizer)
    model = make_model("tiny")
    with torch.no_grad():
        together = dpo_method.sequence_logps(model, **{k: v for k, v in dpo_collate([data[0], data[1]]).items()
                                                if k in ("input_ids", "labels")})
        alone = dpo_method.sequence_logps(model, **{k: v for k, v in dpo_collate([data[0]]).items()
                                             if k in ("input_ids", "labels")})
    # row order in a batch: chosen_0, chosen_1, rejected_0, rejected_1; pair 0 alone was padded differently
    torch.testing.assert_close(together[[0, 2]], alone, atol=1e-5, rtol=1e-5)
    # a sum, not a mean: the long chosen reply is far less likely in total than the one-word rejected reply
    assert together[1] < together[3] - 10
    # the labels cover exactly the final reply and its <|im_end|>
    labels = data[0]["chosen"]["labels"]
    assert tokenizer.decode(labels[labels != -100]) == "3加5等于8。<|im_end|>"


def test_dpo_loss_matches_the_formula():
    policy = torch.tensor([-5.0, -9.0, -7.0, -6.0])  # chosen 0, chosen 1, rejected 0, rejected 1
    ref = torch.tensor([-6.0, -8.0, -7.5, -6.5])
    losses, chosen, rejected, margin = dpo_method.dpo_terms(policy, ref, beta=0.1)
    expected_margin = 0.1 * torch.tensor([(-5 + 6) - (-7 + 7.5), (-9 + 8) - (-6 + 6.5)])
    torch.testing.assert_close(margin, expected_margin)
    torch.testing.assert_close(losses, -torch.nn.functional.logsigmoid(expected_margin))
    assert chosen.tolist() == pytest.approx([0.1, -0.1]) and rejected.tolist() == pytest.approx([0.05, 0.05])


def test_precomputed_reference_gives_the_same_losses_as_the_live_one(tmp_path, base):
    common = ("--from", base, "--max_steps", 6, "--batch_size", 4, "--learning_rate", 1e-3, "--max_seq_len", 128)
    live = dpo.main(tiny_args(tmp_path / "live", DEMO / "dpo_eval.jsonl", *common))
    pre = dpo.main(tiny_args(tmp_path / "pre", DEMO / "dpo_eval.jsonl", *common, "--precompute_ref"))
    assert (tmp_path / "pre/out/dpo/ref_logps.pt").exists()
    assert [v for _, v in pre["history"]] == pytest.approx([v for _, v in live["history"]], abs=1e-5)
    assert live["history"][0][1] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the start: log 2
    assert set(live["metrics"]) == {"accuracy", "reward_chosen", "reward_margin", "reward_rejected"}
    # a new run into the same folder (no --resume) scores the reference again: an old table may be another model's
    table = tmp_path / "pre/out/dpo/ref_logps.pt"
    torch.save(torch.zeros_like(torch.load(table, weights_only=True)), table)
    again = dpo.main(tiny_args(tmp_path / "pre", DEMO / "dpo_eval.jsonl", *common, "--precompute_ref"))
    assert again["history"] == pre["history"] and torch.load(table, weights_only=True).abs().sum() > 0


@pytest.mark.slow
def test_dpo_raises_held_out_preference_accuracy_and_moves_every_parameter(tmp_path, base, tokenizer):
    pairs = read_jsonl(DEMO / "dpo_eval.jsonl")
    start = MicroLMForCausalLM.from_pretrained(base)
    before = metrics.preference_accuracy(start, tokenizer, pairs)["accuracy"]
    dpo.main(tiny_args(tmp_path, DEMO / "dpo.jsonl", "--from", base, "--epochs", 1, "--batch_size", 8,
                       "--learning_rate", 5e-3, "--max_seq_len", 256, "--precompute_ref", "--log_interval", 20))
    after = metrics.preference_accuracy(MicroLMForCausalLM.from_pretrained(tmp_path / "out/dpo"), tokenizer,
                                        pairs)["accuracy"]
    assert after >= before + 0.05, (before, after)
    old, new = load_file(base / "model.safetensors"), load_file(tmp_path / "out/dpo/model.safetensors")
    unchanged = [k for k in old if torch.equal(old[k], new[k])]
    assert not unchanged, unchanged


def test_pairs_with_different_prompts_are_reported_and_skipped(tmp_path, tokenizer):
    good = _pair("q", "a", "b")
    bad = _pair("q", "a", "b")
    bad["rejected"][0]["content"] = "another question"
    data = DPODataset(write_jsonl(tmp_path / "dpo.jsonl", [good, bad, {"chosen": []}]), tokenizer)
    assert len(data) == 1
    assert [r.split(":")[1] for r in data.rows.bad_lines] == ["2", "3"]
    assert "do not share the same prompt" in data.rows.bad_lines[0]


@pytest.mark.slow
def test_dpo_under_two_gloo_ranks_matches_one_process(tmp_path, base):
    common = ["--from", base, "--max_steps", 3, "--learning_rate", 1e-3, "--max_seq_len", 128, "--precompute_ref",
              "--save_interval", 100]
    torchrun_2("4-RLHF.py", tiny_args(tmp_path / "ddp", DEMO / "dpo_eval.jsonl", *common, "--batch_size", 2))
    dpo.main(tiny_args(tmp_path / "one", DEMO / "dpo_eval.jsonl", *common, "--batch_size", 4))
    # weights after Adam: reduction-order noise in near-zero gradients is amplified (measured 1.6e-5)
    assert max_weight_diff(tmp_path / "ddp/out/dpo", tmp_path / "one/out/dpo") <= 5e-5
    # the reference table was split over the ranks and summed back: both runs scored every pair identically
    torch.testing.assert_close(torch.load(tmp_path / "ddp/out/dpo/ref_logps.pt", weights_only=True),
                               torch.load(tmp_path / "one/out/dpo/ref_logps.pt", weights_only=True))
