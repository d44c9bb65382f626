"""Stage 3, knowledge distillation: the loss reduces to SFT at alpha=1, white-box KL falls on held-out items,
black-box trains on 1024-token rows, vocab mismatches are errors, 2 gloo ranks == 1 process."""

from functools import partial

import pytest
import torch
from helpers import ROOT, load_script, make_model, max_weight_diff, tiny_args, torchrun_2, write_jsonl
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from dataset import SFTDataset, pad_collate
from model import MicroLMForCausalLM
from trainer import kd as kd_method
from trainer import lm_loss

kd = load_script("3-KD.py")
pretrain = load_script("1-pretrain.py")
sft = load_script("2-sft.py")
DEMO = ROOT / "demo" / "data"


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
            _, _, kl = kd_method.kd_loss(student(batch["input_ids"]).logits, teacher(batch["input_ids"]).logits,
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
        loss, ce, kl = kd_method.kd_loss(student(batch["input_ids"]).logits, teacher(batch["input_ids"]).logits,
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
        args = type("A", (), {"out_dir": str(tmp_path), "teacher_preset": None})
        device = torch.device("cpu")

        def log(self, msg):
            pass

    with pytest.raises(ValueError, match="vocab_size 1000 < the student's 6400"):
        kd_method.load_teacher(FakeTrainer(), str(tmp_path / "teacher"), 6400)


@pytest.mark.slow
def test_kd_under_two_gloo_ranks_matches_one_process(tmp_path, models):
    student, teacher = models
    common = ["--from", student, "--teacher", teacher, "--max_steps", 3, "--learning_rate", 1e-3, "--max_seq_len", 128,
              "--save_interval", 100]
    torchrun_2("3-KD.py", tiny_args(tmp_path / "ddp", DEMO / "sft_eval.jsonl", *common, "--batch_size", 2))
    kd.main(tiny_args(tmp_path / "one", DEMO / "sft_eval.jsonl", *common, "--batch_size", 4))
    assert max_weight_diff(tmp_path / "ddp/out/kd", tmp_path / "one/out/kd") <= 1e-5


def test_kd_loss_equals_an_independent_reference_and_is_not_the_reverse_kl():
    """alpha * CE + (1 - alpha) * T^2 * KL(teacher || student) on labelled positions only, computed here with
    F.kl_div(log_target=True) -- not with the function under test."""
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 7, 11, generator=g) * 3, torch.randn(2, 7, 11, generator=g) * 3
    labels = torch.randint(0, 11, (2, 7), generator=g)
    labels[0, :3] = -100
    labels[1, 5:] = -100
    alpha, t = 0.3, 2.0
    loss, ce, kl = kd_method.kd_loss(student, teacher, labels, alpha, t)

    s, te, y = student[:, :-1], teacher[:, :-1], labels[:, 1:]
    mask = y != -100
    ref_ce = torch.nn.functional.cross_entropy(s[mask], y[mask], reduction="sum")
    s_logp, t_logp = (torch.log_softmax(x[mask] / t, -1) for x in (s, te))
    ref_kl = torch.nn.functional.kl_div(s_logp, t_logp, log_target=True, reduction="sum")  # KL(teacher || student)
    reverse = torch.nn.functional.kl_div(t_logp, s_logp, log_target=True, reduction="sum")
    torch.testing.assert_close(ce, ref_ce)
    torch.testing.assert_close(kl, ref_kl)
    torch.testing.assert_close(loss, alpha * ref_ce + (1 - alpha) * t * t * ref_kl)
    assert not torch.allclose(kl, reverse, rtol=1e-2)  # the direction matters on these logits
    assert not torch.allclose(loss, alpha * ref_ce + (1 - alpha) * ref_kl, rtol=1e-2)  # and so does T^2


def test_a_larger_teacher_vocabulary_is_cut_to_the_students_ids(tmp_path, tokenizer):
    """A teacher with 64 extra vocabulary rows: the KD stage's logged KL (one step at lr 0, every row in the batch)
    equals KL(teacher's first vocab_size logits || student), computed here; over the full vocabulary it would not."""
    pretrain.main(tiny_args(tmp_path / "s", DEMO / "pretrain_eval.jsonl", "--max_steps", 1, "--max_seq_len", 32,
                            "--batch_size", 2))
    student_dir = tmp_path / "s/out/pretrain"
    student = MicroLMForCausalLM.from_pretrained(student_dir).eval()
    vocab = student.config.vocab_size
    teacher_dir = tmp_path / "big"
    make_model(vocab_size=vocab + 64, seed=3).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    teacher = MicroLMForCausalLM.from_pretrained(teacher_dir).eval()
    rows = write_jsonl(tmp_path / "kd.jsonl", [
        {"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in [("hi", "hello there"), ("2+2?", "4"), ("name?", "a tiny model"), ("ok", "fine, thanks")]])
    summary = kd.main(tiny_args(tmp_path, rows, "--from", student_dir, "--teacher", teacher_dir, "--max_steps", 1,
                                "--batch_size", 4, "--learning_rate", 0, "--temperature", 1.0,
                                "--empty_think_ratio", 0))
    logged = summary["metric_history"][-1][1]["kl"]

    data = SFTDataset(rows, tokenizer, 512, empty_think_ratio=0)
    batch = pad_collate([data[i] for i in range(len(data))], pad_id=0)
    with torch.no_grad():
        s_logp = torch.log_softmax(student(input_ids=batch["input_ids"]).logits[:, :-1], -1)
        t_all = teacher(input_ids=batch["input_ids"]).logits[:, :-1]
    mask = batch["labels"][:, 1:] != -100

    def kl(t_logp):  # mean over the labelled positions, as the stage logs it
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1)[mask].mean().item()

    assert logged == pytest.approx(kl(torch.log_softmax(t_all[..., :vocab], -1)), rel=1e-4)
    # the full-vocabulary softmax, restricted afterwards, would give another value
    assert kl(torch.log_softmax(t_all, -1)[..., :vocab]) != pytest.approx(logged, rel=1e-3)


def test_white_box_kd_on_packed_rows_logs_what_padded_rows_log(tmp_path, tokenizer):
    """The teacher sees the packed rows' position ids too: packing changes no CE or KL (one step at lr 0)."""
    teacher_dir = tmp_path / "teacher"
    make_model(seed=3, initializer_range=0.3).save_pretrained(teacher_dir)  # confident: a KL well above 0
    tokenizer.save_pretrained(teacher_dir)
    rows = write_jsonl(tmp_path / "kd.jsonl", [
        {"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in [("hi", "hello there"), ("2+2?", "4"), ("name?", "a tiny model"), ("ok", "fine, thanks")] * 2])
    common = ("--from", "none", "--teacher", teacher_dir, "--max_steps", 1, "--batch_size", 8, "--learning_rate", 0,
              "--max_seq_len", 128)
    packed = kd.main(tiny_args(tmp_path / "pack", rows, *common))["metric_history"][-1][1]
    padded = kd.main(tiny_args(tmp_path / "pad", rows, *common, "--no_pack"))["metric_history"][-1][1]
    assert packed["kl"] > 0.1
    assert packed == pytest.approx(padded, rel=1e-4)
