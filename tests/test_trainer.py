"""The training engine through the stage scripts: loss falls, resume is exact, accumulation and DDP are equivalent,
checkpoints and logs are written, bad data is handled."""

import contextlib
import json
import os
import re

import pytest
import torch
from helpers import ROOT, load_script, max_weight_diff, pretrain_rows, sft_rows, tiny_args, torchrun_2, write_jsonl
from safetensors.torch import load_file

from model import MicroLMForCausalLM
from trainer import lr_at

pretrain = load_script("1-pretrain.py")
sft = load_script("2-sft.py")


def _weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def test_pretrain_loss_falls_well_below_its_start(tmp_path, pretrain_file):
    result = pretrain.main(tiny_args(tmp_path, pretrain_file, "--max_seq_len", 64, "--batch_size", 8,
                                     "--max_steps", 60, "--learning_rate", 3e-3))
    first, last = result["first_loss"], result["last_loss"]
    assert first > 8.0  # ~ln(6400) at random init
    assert last < first - 4.0, (first, last)
    out = tmp_path / "out" / "pretrain"
    model = MicroLMForCausalLM.from_pretrained(out)  # a from_pretrained-loadable checkpoint with its tokenizer
    assert model.config.hidden_size == 64 and (out / "tokenizer.json").exists()
    png = tmp_path / "images" / "pretrain_loss.png"
    assert png.exists() and png.stat().st_size > 5000


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, pretrain_file):
    common = ("--max_seq_len", 32, "--batch_size", 4, "--max_steps", 10, "--save_interval", 100,
              "--learning_rate", 1e-3)
    pretrain.main(tiny_args(tmp_path / "a", pretrain_file, *common))
    pretrain.main(tiny_args(tmp_path / "b", pretrain_file, *common, "--stop_at_step", 4))
    stopped = json.loads((tmp_path / "b/out/pretrain/resume/state.json").read_text())
    assert stopped["step"] == 4 and stopped["row"] == 16
    resumed = pretrain.main(tiny_args(tmp_path / "b", pretrain_file, *common, "--resume"))
    assert resumed["steps"] == 10
    a, b = _weights(tmp_path / "a/out/pretrain"), _weights(tmp_path / "b/out/pretrain")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full = json.loads((tmp_path / "a/out/pretrain/resume/state.json").read_text())["history"]
    assert [round(v, 6) for _, v in resumed["history"]] == [round(v, 6) for _, v in full]


def test_accumulation_matches_a_larger_batch(tmp_path, sft_file):
    # SFT rows differ in length and padding: only a token-normalised loss makes these equal
    common = ("--max_seq_len", 64, "--max_steps", 3, "--learning_rate", 1e-3, "--grad_clip", 0)
    pretrain.main(tiny_args(tmp_path / "init", pretrain_file_for(tmp_path), "--max_steps", 1, "--max_seq_len", 16,
                            "--batch_size", 2))
    base = str(tmp_path / "init/out/pretrain")
    sft.main(tiny_args(tmp_path / "acc", sft_file, *common, "--from", base, "--batch_size", 2,
                       "--accumulation_steps", 2))
    sft.main(tiny_args(tmp_path / "big", sft_file, *common, "--from", base, "--batch_size", 4))
    a, b = _weights(tmp_path / "acc/out/sft"), _weights(tmp_path / "big/out/sft")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert max((a[k] - _weights(base)[k]).abs().max().item() for k in a) > 1e-4  # and training did move them


# writes reasoning on the last assistant turn only (as Qwen3's template does before the last user turn)
LAST_REASONING_ONLY = ("{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}"
                       "{%- if loop.last and m.reasoning_content %}{{- '<think>\\n' + m.reasoning_content + "
                       "'\\n</think>\\n\\n' }}{%- endif %}{{- m.content + '<|im_end|>\\n' }}{%- endfor %}")


def test_tokens_are_real_tokens_max_steps_runs_more_epochs_and_lost_fields_are_counted(tmp_path, capsys):
    """The summary, the report card and the logs count input tokens without padding (the padded count beside);
    --max_steps beyond --epochs runs the epochs it needs and says so; rows whose template drops a field are counted."""
    from transformers import AutoTokenizer

    from dataset import SFTDataset
    from model import TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.chat_template = LAST_REASONING_ONLY
    tok.save_pretrained(tmp_path / "tok")
    rows = sft_rows(8, seed=1)
    for r in rows[:3]:  # reasoning on a turn a later user turn follows: the template drops it
        r["conversations"] = [{"role": "user", "content": "你好"},
                              {"role": "assistant", "content": "你好！", "reasoning_content": "打个招呼。"},
                              *r["conversations"]]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    lengths = [len(item["input_ids"]) for item in SFTDataset(path, tok, 64, empty_think_ratio=0)]
    summary = sft.main(tiny_args(tmp_path, path, "--from", "none", "--tokenizer", tmp_path / "tok", "--max_seq_len",
                                 64, "--batch_size", 4, "--epochs", 1, "--max_steps", 6, "--no_pack",
                                 "--empty_think_ratio", 0))
    out = capsys.readouterr().out
    assert summary["steps"] == 6 and "--max_steps 6 takes 3 epochs of 2 steps" in out
    assert summary["tokens"] == 3 * sum(lengths) < summary["padded_tokens"]
    card = json.loads((tmp_path / "out/report.json").read_text())[-1]
    assert (card["tokens"], card["padded_tokens"]) == (summary["tokens"], summary["padded_tokens"])
    assert f"{summary['tokens']:,} ({summary['padded_tokens']:,} padded)" in (tmp_path / "out/report.md").read_text()
    assert "counted each time they were read: reasoning_content x9" in out  # 3 rows x 3 epochs


def test_padded_pretraining_counts_the_documents_tokens_not_the_padding(tmp_path, tokenizer):
    from dataset import PretrainDataset

    path = write_jsonl(tmp_path / "p.jsonl", pretrain_rows(8))
    data = PretrainDataset(path, tokenizer, 64, packed=False)
    real = sum(int((data[i]["labels"] != -100).sum()) for i in range(8))  # a document's tokens are its labels
    summary = pretrain.main(tiny_args(tmp_path, path, "--padded", "--max_seq_len", 64, "--batch_size", 4,
                                      "--epochs", 1))
    assert summary["tokens"] == real < summary["padded_tokens"] == 8 * 64


def pretrain_file_for(tmp_path):
    return write_jsonl(tmp_path / "p.jsonl", pretrain_rows(40))


@pytest.mark.e2e
def test_sft_starts_from_pretrain_and_a_missing_checkpoint_names_its_stage(tmp_path, sft_file):
    with pytest.raises(FileNotFoundError, match=r"out/pretrain.*1-pretrain\.py"):
        sft.main(tiny_args(tmp_path, sft_file, "--max_steps", 1))
    pretrain.main(tiny_args(tmp_path, pretrain_file_for(tmp_path), "--max_steps", 2, "--max_seq_len", 16,
                            "--batch_size", 2))
    result = sft.main(tiny_args(tmp_path, sft_file, "--max_steps", 20, "--batch_size", 8, "--learning_rate", 3e-3,
                                "--max_seq_len", 64))
    assert result["last_loss"] < result["first_loss"] - 1.0
    assert (tmp_path / "out/sft/model.safetensors").exists()
    # --save_as: a second SFT run on top of the first writes beside it and leaves it as it was
    before = (tmp_path / "out/sft/model.safetensors").read_bytes()
    sft.main(tiny_args(tmp_path, sft_file, "--from", "sft", "--save_as", "sft_tools", "--max_steps", 2,
                       "--batch_size", 8, "--max_seq_len", 64))
    assert (tmp_path / "out/sft/model.safetensors").read_bytes() == before
    assert max_weight_diff(tmp_path / "out/sft", tmp_path / "out/sft_tools") > 0
    assert (tmp_path / "images/sft_tools_loss.png").exists()
    # and a later run starts from it by that name, as from a stage's
    sft.main(tiny_args(tmp_path, sft_file, "--from", "sft_tools", "--save_as", "sft_more", "--max_steps", 1,
                       "--batch_size", 8, "--max_seq_len", 64, "--learning_rate", 0))
    assert max_weight_diff(tmp_path / "out/sft_tools", tmp_path / "out/sft_more") == 0


def test_malformed_lines_are_counted_and_strict_stops(tmp_path, capsys):
    rows = pretrain_rows(40)
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines[3] = "{broken"
    lines[10] = json.dumps({"txt": "wrong key"})
    path = write_jsonl(tmp_path / "pre.jsonl", lines)
    pretrain.main(tiny_args(tmp_path, path, "--max_steps", 2, "--max_seq_len", 16, "--batch_size", 2))
    captured = capsys.readouterr()
    assert f"{path}:4:" in captured.err and f"{path}:11:" in captured.err  # each reported with file:line
    assert "2 malformed line(s) were skipped" in captured.out + captured.err
    with pytest.raises(ValueError, match=rf"{path}:4:"):
        pretrain.main(tiny_args(tmp_path, path, "--max_steps", 2, "--strict"))


@pytest.mark.e2e
def test_wandb_offline_writes_a_run_resumed_under_the_same_id_and_disabled_writes_nothing(tmp_path, pretrain_file,
                                                                                         monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    common = ("--max_steps", 4, "--max_seq_len", 16, "--batch_size", 2, "--use_wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    pretrain.main(tiny_args(tmp_path / "offline", pretrain_file, *common, "--stop_at_step", 2))
    pretrain.main(tiny_args(tmp_path / "offline", pretrain_file, *common, "--resume"))
    runs = sorted((tmp_path / "offline/out/pretrain/wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(any(r.rglob("*.wandb")) for r in runs)
    run_id = json.loads((tmp_path / "offline/out/pretrain/resume/state.json").read_text())["run_id"]
    # the resumed run continues the same wandb run (wandb adds "-1" to the folder when both start in one second)
    assert run_id and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", r.name) for r in runs), runs
    monkeypatch.setenv("WANDB_MODE", "disabled")
    pretrain.main(tiny_args(tmp_path / "disabled", pretrain_file, *common))
    assert not (tmp_path / "disabled/out/pretrain/wandb").exists()


def test_swanlab_offline_writes_a_run(tmp_path, pretrain_file, monkeypatch):
    monkeypatch.setenv("SWANLAB_MODE", "offline")
    pretrain.main(tiny_args(tmp_path, pretrain_file, "--max_steps", 2, "--max_seq_len", 16, "--batch_size", 2,
                            "--logger", "swanlab"))
    assert len(list((tmp_path / "out/pretrain/swanlog").glob("run-*/*.swanlab"))) == 1


def _nan_trainer(tmp_path, pretrain_file, *extra):
    from dataset import PretrainDataset
    from trainer import Trainer

    args = pretrain.build_parser().parse_args(tiny_args(tmp_path, pretrain_file, "--max_seq_len", 16,
                                                        "--batch_size", 2, *extra))
    trainer = Trainer(args, "pretrain")
    return trainer, trainer.build_model(), PretrainDataset(args.data_path, trainer.tokenizer, 16)


def _loss_nan_on(bad_calls):
    from trainer import lm_loss

    calls = []

    def loss_fn(model, batch):
        loss, metrics = lm_loss(model, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) in bad_calls else loss), metrics
    return loss_fn


def test_loss_fn_metrics_are_normalised_like_the_loss_and_returned(tmp_path, pretrain_file):
    from trainer import count_label_tokens, lm_loss

    def loss_fn(model, batch):
        loss, _ = lm_loss(model, batch)
        return loss, {"double_loss": 2 * loss.detach(), "label_tokens": count_label_tokens(batch).float()}

    trainer, model, data = _nan_trainer(tmp_path, pretrain_file, "--max_steps", 3, "--accumulation_steps", 2)
    result = trainer.fit(model, data, loss_fn=loss_fn)
    assert result["metrics"]["double_loss"] == pytest.approx(2 * result["last_loss"], rel=1e-5)
    assert result["metrics"]["label_tokens"] == pytest.approx(1.0)  # a per-unit mean of the count itself


def test_non_finite_steps_are_skipped_and_too_many_in_a_row_stop_the_run(tmp_path, pretrain_file, capsys):
    trainer, model, data = _nan_trainer(tmp_path / "skip", pretrain_file, "--max_steps", 6)
    result = trainer.fit(model, data, loss_fn=_loss_nan_on({2, 4}))
    assert result["steps"] == 6 and "update skipped (1 in a row)" in capsys.readouterr().out
    assert all(torch.isfinite(p).all() for p in model.parameters())

    trainer, model, data = _nan_trainer(tmp_path / "stop", pretrain_file, "--max_steps", 20, "--save_interval", 1,
                                        "--max_bad_steps", 3)
    with pytest.raises(RuntimeError, match="3 non-finite steps in a row at step 4"):
        trainer.fit(model, data, loss_fn=_loss_nan_on(set(range(2, 100))))
    # the kept checkpoint is the last good one: skipped steps never touched the weights
    trainer, model, data = _nan_trainer(tmp_path / "one", pretrain_file, "--max_steps", 1)
    trainer.fit(model, data)
    kept, good = _weights(tmp_path / "stop/out/pretrain"), _weights(tmp_path / "one/out/pretrain")
    assert all(torch.equal(kept[k], good[k]) for k in good)


@pytest.mark.parametrize("optimizer", [[], ["--no_fused_adamw"]], ids=["fused", "plain"])
def test_skipped_steps_are_found_at_the_next_log_without_a_sync_per_step(tmp_path, pretrain_file, capsys, optimizer):
    # log (and look at the device-side counter) only at the end: the skip itself must not need the host
    trainer, model, data = _nan_trainer(tmp_path, pretrain_file, "--max_steps", 6, "--log_interval", 100, *optimizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = trainer.fit(model, data, loss_fn=_loss_nan_on({2, 3, 5}))
    out = capsys.readouterr().out
    assert "step 2: non-finite loss or gradient, update skipped (1 in a row)" in out
    assert "step 3: non-finite loss or gradient, update skipped (2 in a row)" in out
    assert "step 5: non-finite loss or gradient, update skipped (1 in a row)" in out
    assert result["steps"] == 6 and all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # good steps did update


def test_fused_adamw_trains_like_the_plain_one(tmp_path, pretrain_file):
    runs = {}
    for name, flags in [("fused", []), ("plain", ["--no_fused_adamw"])]:
        result = pretrain.main(tiny_args(tmp_path / name, pretrain_file, "--max_seq_len", 32, "--batch_size", 4,
                                         "--max_steps", 8, "--learning_rate", 3e-3, *flags))
        runs[name] = (result["history"], _weights(tmp_path / name / "out/pretrain"))
    (h1, w1), (h2, w2) = runs.values()
    assert [s for s, _ in h1] == [s for s, _ in h2]
    assert max(abs(a - b) for (_, a), (_, b) in zip(h1, h2)) < 1e-4
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)


def test_grad_checkpoint_trains_like_the_plain_run(tmp_path, pretrain_file, capsys):
    """--grad_checkpoint recomputes activations: the same losses and weights, and the saved model loads plain."""
    runs = {}
    for name, flags in [("plain", []), ("ckpt", ["--grad_checkpoint"])]:
        result = pretrain.main(tiny_args(tmp_path / name, pretrain_file, "--max_seq_len", 32, "--batch_size", 4,
                                         "--max_steps", 6, "--learning_rate", 3e-3, *flags))
        runs[name] = (result["history"], _weights(tmp_path / name / "out/pretrain"))
    assert "activation checkpointing: 2 blocks" in capsys.readouterr().out  # both of tiny's blocks
    (h1, w1), (h2, w2) = runs.values()
    assert [s for s, _ in h1] == [s for s, _ in h2]
    assert max(abs(a - b) for (_, a), (_, b) in zip(h1, h2)) < 1e-5
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)


def test_unwritable_output_is_an_error_before_training(tmp_path, pretrain_file):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit, match="cannot write checkpoints"):
        pretrain.main(tiny_args(tmp_path, pretrain_file, "--out_dir", blocker))


def test_lr_warms_up_then_decays_to_the_floor():
    lrs = [lr_at(s, 100, 1e-3, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)


@pytest.mark.slow
def test_ddp_two_ranks_match_one_process_on_the_same_global_batch(tmp_path, pretrain_file):
    # padded rows: each rank has its own real-token count, and the totals must still be the whole batch's
    common = ["--max_seq_len", "32", "--max_steps", "4", "--learning_rate", "1e-3", "--save_interval", "100",
              "--padded"]
    torchrun_2("1-pretrain.py", tiny_args(tmp_path / "ddp", pretrain_file, *common, "--batch_size", 2))
    pretrain.main(tiny_args(tmp_path / "single", pretrain_file, *common, "--batch_size", 4))
    assert max_weight_diff(tmp_path / "ddp/out/pretrain", tmp_path / "single/out/pretrain") <= 1e-5
    cards = [json.loads((tmp_path / f"{run}/out/report.json").read_text())[-1] for run in ("ddp", "single")]
    assert [(c["tokens"], c["padded_tokens"]) for c in cards] == [(cards[1]["tokens"], 4 * 4 * 32)] * 2
    assert cards[1]["tokens"] < 4 * 4 * 32
    # each rank wrote its own RNG stream, rank 0 the rest: both ranks ended on the same step
    resume = tmp_path / "ddp/out/pretrain/resume"
    assert (resume / "rng_rank0.pt").exists() and (resume / "rng_rank1.pt").exists()
    assert json.loads((resume / "state.json").read_text())["step"] == 4


def _epoch(n, batch, world, lengths=None, seed=0, start_row=0, **kw):
    from trainer.engine import ShardedBatchSampler

    per_rank = []
    for rank in range(world):
        sampler = ShardedBatchSampler(n, batch, world, rank, seed, lengths=lengths, **kw)
        sampler.set_epoch(1, start_row)
        per_rank.append(list(sampler))
    # interleave back into global micro-steps: [rank 0's rows, rank 1's rows, ...] per step
    return [sum((steps[k] for steps in per_rank), []) for k in range(len(per_rank[0]))]


def test_length_grouped_batches_pad_less_and_keep_order_independent_of_world_size():
    g = torch.Generator().manual_seed(0)
    n, lengths = 1000, torch.randint(10, 500, (1000,), generator=g)
    plain, grouped = _epoch(n, 8, 1), _epoch(n, 8, 1, lengths, window=512, block=64)
    assert sorted(sum(grouped, [])) == sorted(set(sum(grouped, [])))  # no row twice
    assert len(grouped) == len(plain) == n // 8

    def padded(steps):  # what pad_collate computes: every row padded to its batch's longest
        return sum(len(s) * max(int(lengths[i]) for i in s) for s in steps)
    assert padded(grouped) < 0.7 * padded(plain)
    # the order is a function of seed, epoch and lengths: 2 ranks x 4 walk the same rows as 1 x 8, and a resume
    # from row 400 (with either world size) continues exactly there
    two_ranks = _epoch(n, 4, 2, lengths, window=512, block=64)
    assert sum(two_ranks, []) == sum(grouped, [])
    assert sum(_epoch(n, 8, 1, lengths, start_row=400, window=512, block=64), []) == sum(grouped, [])[400:]
    assert sum(_epoch(n, 4, 2, lengths, start_row=400, window=512, block=64), []) == sum(grouped, [])[400:]
    # and it is still a shuffle: another epoch (seed) gives another order
    assert _epoch(n, 8, 1, lengths, seed=1, window=512, block=64) != grouped


def test_group_by_length_is_opt_in_and_sft_rows_have_lengths(tmp_path, sft_file):
    from dataset import SFTDataset
    from trainer.engine import ShardedBatchSampler

    sft = load_script("2-sft.py")
    args = sft.build_parser().parse_args(tiny_args(tmp_path, sft_file))
    assert not args.group_by_length and sft.build_parser().parse_args(
        tiny_args(tmp_path, sft_file, "--group_by_length")).group_by_length
    from transformers import AutoTokenizer

    from model import TOKENIZER_DIR
    data = SFTDataset(sft_file, AutoTokenizer.from_pretrained(TOKENIZER_DIR), 64)
    assert len(data.lengths) == len(data) and (data.lengths > 0).all()
    s = ShardedBatchSampler(len(data), 2, 1, 0, 0, lengths=data.lengths)
    assert sorted(sum(list(s), [])) == sorted(sum(list(ShardedBatchSampler(len(data), 2, 1, 0, 0)), []))
    # and the engine hands the lengths on: the same rows and real tokens, less padding
    runs = [sft.main(tiny_args(tmp_path / name, sft_file, "--from", "none", "--max_seq_len", 64, "--batch_size", 8,
                               "--epochs", 1, "--no_pack", *extra)) for name, extra in (("plain", ()),
                                                                                       ("grouped", ("--group_by_length",)))]
    assert runs[0]["tokens"] == runs[1]["tokens"] and runs[1]["padded_tokens"] < 0.9 * runs[0]["padded_tokens"]


def test_every_epoch_draws_a_new_order_and_the_same_epoch_the_same_one():
    from trainer.engine import ShardedBatchSampler

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 500, (200,), generator=g)
    for kw in ({}, {"lengths": lengths, "window": 64, "block": 16}):
        orders = []
        for epoch in (0, 1, 0):
            sampler = ShardedBatchSampler(200, 8, 1, 0, 0, **kw)
            sampler.set_epoch(epoch)
            orders.append(sum(list(sampler), []))
        assert orders[0] == orders[2] and orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1])


def test_schedule_flags_reach_the_learning_rate(tmp_path, pretrain_file, monkeypatch):
    """--min_lr_ratio and --warmup_steps (-1: 1% of the run, at least one step) are what every step's lr uses."""
    import trainer.engine

    calls = []
    real = trainer.engine.lr_at
    monkeypatch.setattr(trainer.engine, "lr_at", lambda *a: calls.append(a) or real(*a))
    for extra, warmup in ((("--warmup_steps", -1), 1), (("--warmup_steps", 2), 2)):
        calls.clear()
        pretrain.main(tiny_args(tmp_path, pretrain_file, "--max_seq_len", 16, "--batch_size", 2, "--max_steps", 20,
                                "--min_lr_ratio", 0.25, "--learning_rate", 1e-3, "--save_interval", 100, *extra))
        assert [c[1:] for c in calls] == [(20, 1e-3, warmup, 0.25)] * 20 and [c[0] for c in calls] == list(range(20))


def test_eval_data_and_eval_split_together_are_refused(tmp_path, pretrain_file):
    with pytest.raises(SystemExit, match="give one of them"):
        pretrain.main(tiny_args(tmp_path, pretrain_file, "--eval_data", pretrain_file, "--eval_split", 0.1))


@pytest.mark.e2e
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_trains_and_resumes_bit_identically(tmp_path, pretrain_file, dtype):
    """The engine's real autocast paths (bf16 is the default wherever the hardware has it; fp16 adds a GradScaler
    whose scale must survive a resume) with a DataLoader worker, as users run it."""
    common = ("--max_seq_len", 32, "--batch_size", 4, "--max_steps", 8, "--save_interval", 100,
              "--learning_rate", 3e-3)

    def run(folder, *extra):  # the later --dtype / --num_workers override tiny_args' float32 / 0
        return pretrain.main(tiny_args(tmp_path / folder, pretrain_file, *common, *extra, "--dtype", dtype,
                                       "--num_workers", 1))

    with linear_dtypes() as seen:
        full = run("a")
    assert seen == {getattr(torch, dtype)}  # observed inside the forward: the matmuls run in the asked dtype
    losses = [v for _, v in full["history"]]
    assert losses[-1] < losses[0]
    run("b", "--stop_at_step", 3)
    if dtype == "float16":
        scale = torch.load(tmp_path / "b/out/pretrain/resume/scaler.pt", weights_only=True)["scale"]
        assert scale > 0
    resumed = run("b", "--resume")
    assert [v for _, v in resumed["history"]] == losses
    a, b = _weights(tmp_path / "a/out/pretrain"), _weights(tmp_path / "b/out/pretrain")
    assert all(a[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a)  # fp32 master weights
    if dtype == "float16":  # the scaler's own state comes back on resume (a scale set in the saved state stays)
        run("c", "--stop_at_step", 3)
        saved = tmp_path / "c/out/pretrain/resume/scaler.pt"
        state = torch.load(saved, weights_only=True)
        torch.save({**state, "scale": 1024.0}, saved)
        run("c", "--resume")
        assert torch.load(saved, weights_only=True)["scale"] == 1024.0


@contextlib.contextmanager
def linear_dtypes():
    """The dtypes the model's Linear layers compute in while training (a global forward hook, on every module)."""
    seen = set()

    def hook(module, args, output):
        if isinstance(module, torch.nn.Linear) and module.training:
            seen.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def test_the_default_dtype_is_the_fast_one_and_is_applied_in_the_forward(tmp_path, pretrain_file, monkeypatch):
    """--dtype auto (the default) trains in the device's fast dtype: bf16 where the hardware has it (faked here, as
    on a GPU), fp32 where it has not -- seen in the matmuls, not read from the arguments."""
    import trainer.engine

    argv = tiny_args(tmp_path, pretrain_file, "--max_seq_len", 16, "--batch_size", 2, "--max_steps", 2,
                     "--dtype", "auto")
    for fast in (torch.bfloat16, torch.float32):
        monkeypatch.setattr(trainer.engine, "fast_dtype", lambda device, fast=fast: fast)
        with linear_dtypes() as seen:
            pretrain.main(argv)
        assert seen == {fast}


def _dump_grads(tmp_path, name, script, argv, ranks=1):
    """(raw gradients of the first optimizer step, each parameter's weight decay), rank 0's
    (tests/helpers/grad_dump.py)."""
    import subprocess
    import sys

    prefix = tmp_path / name
    helper = ["tests/helpers/grad_dump.py", prefix, script, *argv]
    if ranks > 1:
        torchrun_2(helper[0], helper[1:])
    else:
        subprocess.run([sys.executable, *map(str, helper)], check=True, cwd=ROOT, timeout=300,
                       stdout=subprocess.DEVNULL)
    dumped = torch.load(f"{prefix}.rank0.pt", weights_only=True)
    grads = dumped["grads"]
    if ranks > 1:  # DDP: every rank applies the same all-reduced gradient
        other = torch.load(f"{prefix}.rank1.pt", weights_only=True)["grads"]
        assert all(torch.equal(a, b) for a, b in zip(grads, other))
    return grads, dumped["weight_decay"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_raw_gradients_of_one_rank_two_ranks_and_accumulation_equal_the_mean_loss_gradient(tmp_path, kind):
    """Gradients, not weights after AdamW and clipping (which would hide a constant factor): 1 rank x batch 4,
    1 rank x batch 2 x accumulation 2 and 2 ranks x batch 2 all apply exactly d(mean loss over the labelled tokens
    of the 4 rows)/dw, computed here by hand."""
    from functools import partial

    from dataset import PretrainDataset, SFTDataset, pad_collate
    from trainer.engine import lm_loss, param_groups

    pretrain.main(tiny_args(tmp_path / "init", pretrain_file_for(tmp_path), "--max_steps", 1, "--max_seq_len", 16,
                            "--batch_size", 2))
    base = tmp_path / "init/out/pretrain"
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(base)
    if kind == "pretrain":  # exactly 4 packed blocks (the last one partly padding)
        data_file = write_jsonl(tmp_path / "p4.jsonl", [{"text": "北京是一个城市。The cat runs fast." * 2}] * 2)
        n_tokens = len(PretrainDataset(data_file, tokenizer, 16).tokens)
        seq = -(-n_tokens // 4)
        probe = PretrainDataset(data_file, tokenizer, seq)
        assert len(probe) == 4
        script = "1-pretrain.py"
        rows, collate = [probe[i] for i in range(4)], None
    else:  # 4 chats of different lengths: padding differs between the layouts, the token-normalised loss must not
        data_file = write_jsonl(tmp_path / "s4.jsonl", sft_rows(4, seed=3))
        probe = SFTDataset(data_file, tokenizer, 64, empty_think_ratio=0)
        script, seq = "2-sft.py", 64
        rows, collate = [probe[i] for i in range(4)], partial(pad_collate, pad_id=0)
    common = ["--from", base, "--max_steps", 1, "--max_seq_len", seq, "--grad_clip", 0, "--learning_rate", 1e-3,
              "--empty_think_ratio", 0]

    def args(folder, *extra):
        return tiny_args(tmp_path / folder, data_file, *common, *extra)

    one, weight_decay = _dump_grads(tmp_path, "one", script, args("one", "--batch_size", 4))
    acc, _ = _dump_grads(tmp_path, "acc", script, args("acc", "--batch_size", 2, "--accumulation_steps", 2))
    ddp, _ = _dump_grads(tmp_path, "ddp", script, args("ddp", "--batch_size", 2), ranks=2)

    model = MicroLMForCausalLM.from_pretrained(base).train()
    batch = collate(rows) if collate else {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    loss_sum, _ = lm_loss(model, batch)
    (loss_sum / (batch["labels"][:, 1:] != -100).sum()).backward()
    reference = [p.grad for group in param_groups(model, 0.0) for p in group["params"]]
    assert len(reference) == len(one)
    # the optimizer the engine built decays exactly the attention/MLP matrices (default --weight_decay 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in param_groups(model, 0.0) for p in group["params"]]
    assert weight_decay == [0.01 if n.endswith("proj.weight") else 0.0 for n in order], order
    for name, grads in [("1 x 4", one), ("accumulation 2", acc), ("2 ranks", ddp)]:
        for ref, got in zip(reference, grads):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-7, msg=name)
    if kind == "pretrain":  # --grad_clip c scales the whole gradient to norm c, and only when it is larger
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in reference])).item()
        clip = norm / 3
        clipped, _ = _dump_grads(tmp_path, "clip", script, args("clip", "--batch_size", 4, "--grad_clip", clip))
        for ref, got in zip(reference, clipped):
            torch.testing.assert_close(got, ref * (clip / norm), rtol=1e-4, atol=1e-7)


def test_weight_decay_goes_to_matrices_only_and_every_parameter_is_in_one_group(tiny_model):
    from trainer.engine import param_groups

    decay, no_decay = param_groups(tiny_model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert not decayed & kept and decayed | kept == set(names.values())
    assert all(n.endswith("proj.weight") for n in decayed), decayed  # attention and MLP matrices
    assert any("embed_tokens" in n for n in kept) and all("norm" in n or "embed" in n for n in kept), kept


def test_prepare_window_runs_once_per_window_before_counting_and_its_batches_are_trained(tmp_path, pretrain_file):
    """The RL hook: with accumulation 2 and repeat 2, prepare_window sees each window's 2 micro-batches once, before
    count_fn, and the loss then sees what it put into them on every repeated step."""
    from trainer import count_label_tokens, lm_loss

    windows, order = [], []

    def prepare(micro):
        order.append("prepare")
        windows.append(len(micro))
        for b in micro:
            b["tag"] = len(windows)

    def count(batch):
        order.append("count")
        return count_label_tokens(batch)

    def loss_fn(model, batch):
        loss, _ = lm_loss(model, batch)
        return loss, {"tag": count_label_tokens(batch).float() * batch["tag"]}

    trainer, model, data = _nan_trainer(tmp_path, pretrain_file, "--max_steps", 6, "--accumulation_steps", 2)
    result = trainer.fit(model, data, loss_fn=loss_fn, count_fn=count, prepare_window=prepare, repeat=2)
    assert result["steps"] == 6 and windows == [2, 2, 2]
    assert order == ["prepare", "count", "count"] * 3
    # steps 1-2 train on window 1, 3-4 on window 2, 5-6 on window 3 (the metric is the window's tag per unit)
    assert [m["tag"] for _, m in result["metric_history"]] == pytest.approx([1, 1, 2, 2, 3, 3])


def test_rollout_loss_scale_is_sequences_over_tokens_of_the_whole_window():
    """A token-level RL loss is normalised by the completion tokens of every micro-batch of the step (the engine
    divides by sequences): generate_and_score gives each rollout scale = sequences / tokens of the whole window."""
    from types import SimpleNamespace

    from trainer.rl import Rollouts

    masks = [torch.ones(2, 3), torch.tensor([[1.0, 0, 0], [1, 1, 0], [1, 1, 1]])]  # 6 + 6 tokens, 2 + 3 sequences

    class Fixed(Rollouts):
        def __init__(self, token_level, mini_batches=1):
            self.token_level, self.mini_batches = token_level, mini_batches
            self.trainer = SimpleNamespace(device=torch.device("cpu"), env=SimpleNamespace(world_size=1))

        def rollout(self, batch):
            return {"n": len(batch["mask"]), "mask": batch["mask"]}

    for token_level, expected in ((True, 5 / 12), (False, 1.0)):
        micro = [{"mask": m} for m in masks]
        Fixed(token_level).generate_and_score(micro)
        assert [b["rollout"]["scale"] for b in micro] == pytest.approx([expected, expected])
        assert [Rollouts.count(b) for b in micro] == [2, 3]
    # PPO's --mini_batches 2: each micro-batch is its own optimizer step, normalised by its own tokens
    micro = [{"mask": m} for m in masks]
    Fixed(True, mini_batches=2).generate_and_score(micro)
    assert [b["rollout"]["scale"] for b in micro] == pytest.approx([2 / 6, 3 / 6])
