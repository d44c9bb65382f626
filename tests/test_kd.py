"""Stage 3, knowledge distillation: the loss reduces to SFT at alpha=1, white-box KL falls on held-out items,
black-box trains on 1024-token rows, vocab mismatches are errors, 2 gloo ranks == 1 process."""

from functools import partial

import pytest
import torch
from conftest import ROOT, load_script, make_model, max_weight_diff, tiny_args, torchrun_2, write_jsonl
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from dataset import SFTDataset, pad_collate
from model import MicroLMForCausalLM
from trainer import lm_loss

kd = load_script("3-KD.py")
pretrain = load_script("1-pretrain.py")
sft = load_script("2-sft.py")
DEMO = ROOT / "dataset" / "demo"


@pytest.fixture
def models(tmp_path):
    """A barely trained student and a teacher that had some SFT."""
    pretrain.main(tiny_args(tmp_path / "s", DEMO / "pretrain_eval.jsonl", "--max_steps", 2, "--max_seq_len", 32,
                            "--batch_size", 2))
    student = tmp_path / "s/out/pretrain"
    sft.main(tiny_args(tmp_path / "t", DEMO / "sft.jsonl", "--from", student, "--max_steps", 40, "--batch_size", 16,
                       "--learning_rate", 3e-3, "--max_seq_len", 128))
    return student, tmp_path / "t/out/sft"


def _held_out_kl(student_dir, teacher_dir, tokenizer):
    student, teacher = (MicroLMForCausalLM.from_pretrained(d).eval() for d in (student_dir, teacher_dir))
    data = SFTDataset(DEMO / "sft_eval.jsonl", tokenizer, 128)
    total_kl, tokens = 0.0, 0
    with torch.no_grad():
        for batch in DataLoader(data, batch_size=25, collate_fn=partial(pad_collate, pad_id=0)):
            _, _, kl = kd.kd_loss(student(batch["input_ids"]).logits, teacher(batch["input_ids"]).logits,
                                  batch["labels"], alpha=0.5, temperature=1.0)
            total_kl += kl.item()
            tokens += (batch["labels"][:, 1:] != -100).sum().item()
    return total_kl / tokens


def test_alpha_1_is_exactly_the_sft_loss(tmp_path, tokenizer):
    conv = [{"role": "user", "content": "2加3等于几？"}, {"role": "assistant", "content": "2加3等于5。"}]
    data = SFTDataset(write_jsonl(tmp_path / "kd.jsonl", [{"conversations": conv}] * 2), tokenizer)
    batch = pad_collate([data[0], data[1]])
    student, teacher = make_model("tiny", seed=0), make_model("tiny", seed=1)
    with torch.no_grad():
        loss, ce, kl = kd.kd_loss(student(batch["input_ids"]).logits, teacher(batch["input_ids"]).logits,
                                  batch["labels"], alpha=1.0, temperature=2.0)
        sft_loss, _ = lm_loss(student, batch)
    torch.testing.assert_close(loss, sft_loss)
    assert kl > 0  # two different models do disagree; alpha=1 just ignores it


@pytest.mark.slow
def test_white_box_kd_lowers_the_held_out_kl_to_the_teacher(tmp_path, models, tokenizer):
    student, teacher = models
    before = _held_out_kl(student, teacher, tokenizer)
    kd.main(tiny_args(tmp_path / "kd", DEMO / "sft.jsonl", "--from", student, "--teacher", teacher, "--alpha", 0.0,
                      "--temperature", 1.0, "--max_steps", 40, "--batch_size", 16, "--learning_rate", 3e-3,
                      "--max_seq_len", 128))
    after = _held_out_kl(tmp_path / "kd/out/kd", teacher, tokenizer)
    assert after < 0.5 * before, (before, after)


def test_black_box_trains_on_1024_token_rows(tmp_path, tokenizer):
    long_turns = []
    for i in range(40):
        long_turns += [{"role": "user", "content": f"第{i}个问题：请详细解释一下为什么天空是蓝色的？"},
                       {"role": "assistant", "content": "因为大气会散射阳光中的蓝光，" * 6}]
    path = write_jsonl(tmp_path / "sft_1024.jsonl", [{"conversations": long_turns}] * 4)
    assert len(SFTDataset(path, tokenizer, 1024)[0]["input_ids"]) == 1024  # a full 1024-token row
    pretrain.main(tiny_args(tmp_path, DEMO / "pretrain_eval.jsonl", "--max_steps", 1, "--max_seq_len", 32,
                            "--batch_size", 2))
    result = kd.main(tiny_args(tmp_path, path, "--from", tmp_path / "out/pretrain", "--max_steps", 2, "--batch_size", 2,
                               "--max_seq_len", 1024))
    assert result["steps"] == 2
    before = load_file(tmp_path / "out/pretrain/model.safetensors")
    after = load_file(tmp_path / "out/kd/model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_teacher_with_a_smaller_vocabulary_is_an_error(tmp_path, tokenizer):
    small = make_model("tiny", vocab_size=1000)
    small.save_pretrained(tmp_path / "teacher")

    class FakeTrainer:
        args = type("A", (), {"out_dir": str(tmp_path)})
        device = torch.device("cpu")

        def log(self, msg):
            pass

    with pytest.raises(ValueError, match="vocab_size 1000 < the student's 6400"):
        kd.load_teacher(FakeTrainer(), str(tmp_path / "teacher"), 6400)


@pytest.mark.slow
def test_kd_under_two_gloo_ranks_matches_one_process(tmp_path, models):
    student, teacher = models
    common = ["--from", student, "--teacher", teacher, "--max_steps", 3, "--learning_rate", 1e-3, "--max_seq_len", 128,
              "--save_interval", 100]
    torchrun_2("3-KD.py", tiny_args(tmp_path / "ddp", DEMO / "sft_eval.jsonl", *common, "--batch_size", 2))
    kd.main(tiny_args(tmp_path / "one", DEMO / "sft_eval.jsonl", *common, "--batch_size", 4))
    assert max_weight_diff(tmp_path / "ddp/out/kd", tmp_path / "one/out/kd") <= 1e-5
