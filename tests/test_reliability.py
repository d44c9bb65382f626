"""Faults a long run meets, tried for real: kill -9 mid-training, a crash or a full disk in the middle of a checkpoint
write, a poisoned pickle in a resume folder, NaN or an exception on one DDP rank, a different world size on resume,
two torchrun "nodes"; plus fuzzed jsonl for every dataset class and a flood of requests at the server."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, load_script, max_weight_diff, sft_rows, tiny_args, write_jsonl

from trainer import checkpoint as ckpt

pretrain = load_script("1-pretrain.py")
TINY = ("--max_seq_len", 16, "--batch_size", 2, "--learning_rate", 1e-3)


def _stage(argv, **popen):
    return subprocess.Popen([sys.executable, str(ROOT / "1-pretrain.py"), *map(str, argv)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _resume_step(stage_dir):
    try:
        return json.loads((stage_dir / "resume" / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow
def test_kill_9_mid_training_then_resume_equals_the_uninterrupted_run(tmp_path, pretrain_file):
    common = [*TINY, "--max_steps", 150, "--save_interval", 5]
    ref = _stage(tiny_args(tmp_path / "ref", pretrain_file, *common))
    victim = _stage(tiny_args(tmp_path / "run", pretrain_file, *common))
    stage_dir = tmp_path / "run/out/pretrain"
    deadline = time.monotonic() + 120
    while _resume_step(stage_dir) < 20 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)  # no handler, no cleanup: a preempted machine
    victim.wait()
    resumed = _stage(tiny_args(tmp_path / "run", pretrain_file, *common, "--resume"))
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    found = re.search(r"resumed from \S+ at step (\d+)", out)  # resume/ or, killed mid-swap, resume.old/
    assert found and 20 <= int(found.group(1)) < 150, out
    ref.communicate(timeout=300)
    assert ref.returncode == 0
    a, b = (json.loads((tmp_path / d / "out/pretrain/resume/state.json").read_text()) for d in ("ref", "run"))
    assert a["history"] == b["history"] and b["step"] == 150  # every per-step loss, the resumed ones included
    assert max_weight_diff(tmp_path / "ref/out/pretrain", stage_dir) == 0.0  # bit for bit


def test_a_crash_between_writing_and_renaming_keeps_the_last_good_checkpoint(tmp_path, pretrain_file, monkeypatch):
    common = [*TINY, "--max_steps", 6, "--save_interval", 2]
    real = ckpt._atomic_write_dir
    calls = []

    def crash_on_second(tmp, final):
        calls.append(1)
        if len(calls) == 2:  # step 4's state is fully written in resume.tmp, not yet swapped in
            raise KeyboardInterrupt("power cut")
        real(tmp, final)

    monkeypatch.setattr(ckpt, "_atomic_write_dir", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(tiny_args(tmp_path / "run", pretrain_file, *common))
    monkeypatch.setattr(ckpt, "_atomic_write_dir", real)
    stage_dir = tmp_path / "run/out/pretrain"
    assert ckpt.find_resume(stage_dir) == stage_dir / "resume" and _resume_step(stage_dir) == 2
    assert (stage_dir / "resume.tmp" / ckpt.COMPLETE).exists()  # the unswapped folder is never used
    resumed = pretrain.main(tiny_args(tmp_path / "run", pretrain_file, *common, "--resume"))
    pretrain.main(tiny_args(tmp_path / "ref", pretrain_file, *common))
    assert resumed["steps"] == 6 and max_weight_diff(tmp_path / "ref/out/pretrain", stage_dir) == 0.0


def test_a_swap_interrupted_halfway_falls_back_to_the_previous_folder(tmp_path):
    stage = tmp_path / "stage"
    for step in (2, 4):
        tmp = ckpt.resume_tmp_dir(stage)
        tmp.mkdir(parents=True)
        (tmp / "state.json").write_text(json.dumps({"step": step}))
        (tmp / ckpt.COMPLETE).write_text("ok\n")
        if step == 2:
            ckpt._atomic_write_dir(tmp, stage / "resume")
    os.replace(stage / "resume", stage / "resume.old")  # the first rename of the swap happened, the second not
    assert ckpt.find_resume(stage) == stage / "resume.old"


def test_a_full_disk_during_a_save_is_a_clear_error_and_loses_nothing(tmp_path, pretrain_file, monkeypatch):
    common = [*TINY, "--max_steps", 6, "--save_interval", 2]
    real, calls = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            calls.append(1)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match="No space left on device.*last complete checkpoint"):
        pretrain.main(tiny_args(tmp_path, pretrain_file, *common))
    stage_dir = tmp_path / "out/pretrain"
    assert _resume_step(stage_dir) == 2
    from model import MicroLMForCausalLM
    MicroLMForCausalLM.from_pretrained(stage_dir)  # the model folder still loads


def test_a_poisoned_pickle_in_a_resume_folder_is_refused_without_running(tmp_path, pretrain_file):
    common = [*TINY, "--max_steps", 2, "--save_interval", 2]
    pretrain.main(tiny_args(tmp_path, pretrain_file, *common))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle
    resume = tmp_path / "out/pretrain/resume"
    with open(resume / "optimizer.pt", "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        pretrain.main(tiny_args(tmp_path, pretrain_file, *TINY, "--max_steps", 4, "--resume"))
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------------
# distributed

def _torchrun(args, env=None, timeout=300, nproc=2, extra=()):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *extra, "--nproc_per_node", str(nproc),
                           *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.slow
def test_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path, pretrain_file):
    common = [*TINY, "--max_steps", 4, "--save_interval", 100, "--log_interval", 100]
    run = _torchrun(["--standalone", ROOT / "tests/helpers/ddp_fault.py",
                     *tiny_args(tmp_path / "nan", pretrain_file, *common)], env={"FAULT": "nan:2:1"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "step 2: non-finite loss or gradient, update skipped (1 in a row)" in run.stdout + run.stderr
    stage = tmp_path / "nan/out/pretrain"
    assert json.loads((stage / "resume/state.json").read_text())["step"] == 4  # both ranks went on together
    from safetensors.torch import load_file
    assert all(torch.isfinite(w).all() for w in load_file(stage / "model.safetensors").values())


@pytest.mark.slow
def test_an_exception_on_one_rank_ends_every_rank_without_hanging(tmp_path, pretrain_file):
    common = [*TINY, "--max_steps", 50, "--save_interval", 100]
    start = time.monotonic()
    run = _torchrun(["--standalone", ROOT / "tests/helpers/ddp_fault.py",
                     *tiny_args(tmp_path / "raise", pretrain_file, *common)], env={"FAULT": "raise:3:1"}, timeout=120)
    assert run.returncode != 0 and "injected fault on rank 1" in run.stdout + run.stderr
    assert time.monotonic() - start < 120


@pytest.mark.slow
def test_sft_two_ranks_with_accumulation_match_one_process_with_the_whole_batch(tmp_path):
    sft = load_script("2-sft.py")
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows())
    common = ["--max_seq_len", 64, "--max_steps", 3, "--learning_rate", 1e-3, "--save_interval", 100, "--from", "none"]
    run = _torchrun(["--standalone", ROOT / "2-sft.py", *tiny_args(tmp_path / "ddp", data, *common, "--batch_size", 2,
                                                                     "--accumulation_steps", 2)])
    assert run.returncode == 0, run.stderr
    sft.main(tiny_args(tmp_path / "one", data, *common, "--batch_size", 8))
    assert max_weight_diff(tmp_path / "ddp/out/sft", tmp_path / "one/out/sft") <= 1e-5


@pytest.mark.slow
def test_resume_with_fewer_ranks_continues_at_the_same_sample(tmp_path, pretrain_file):
    common = ["--max_seq_len", 16, "--learning_rate", 1e-3, "--max_steps", 6, "--save_interval", 100]
    run = _torchrun(["--standalone", ROOT / "1-pretrain.py",
                     *tiny_args(tmp_path / "run", pretrain_file, *common, "--batch_size", 2, "--stop_at_step", 3)])
    assert run.returncode == 0, run.stderr
    state = json.loads((tmp_path / "run/out/pretrain/resume/state.json").read_text())
    assert state["step"] == 3 and state["row"] == 12  # 3 steps x 2 ranks x batch 2
    # one process with the same global batch (4) goes on from row 12 and ends like one uninterrupted process
    pretrain.main(tiny_args(tmp_path / "run", pretrain_file, *common, "--batch_size", 4, "--resume"))
    pretrain.main(tiny_args(tmp_path / "one", pretrain_file, *common, "--batch_size", 4))
    assert max_weight_diff(tmp_path / "run/out/pretrain", tmp_path / "one/out/pretrain") <= 1e-5


MULTI_NODE = ("torchrun --nnodes 2 --node_rank {rank} --nproc_per_node 1 --master_addr {addr} --master_port {port} "
              "1-pretrain.py")


@pytest.mark.slow
def test_two_torchrun_nodes_train_like_one_node_with_two_processes(tmp_path, pretrain_file):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = tiny_args(tmp_path / "nodes", pretrain_file, *TINY, "--max_steps", 4, "--save_interval", 100)
    nodes = []
    for rank in (0, 1):
        cmd = MULTI_NODE.format(rank=rank, addr="127.0.0.1", port=port).split()
        cmd = [sys.executable, "-m", "torch.distributed.run", *cmd[1:-1], str(ROOT / cmd[-1]), *map(str, common)]
        nodes.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    outs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs
    one = _torchrun(["--standalone", ROOT / "1-pretrain.py",
                     *tiny_args(tmp_path / "one", pretrain_file, *TINY, "--max_steps", 4, "--save_interval", 100)])
    assert one.returncode == 0, one.stderr
    assert max_weight_diff(tmp_path / "nodes/out/pretrain", tmp_path / "one/out/pretrain") <= 1e-6
    # the command the docs give is the one this test ran
    docs = ROOT / "docs"
    assert MULTI_NODE.format(rank="<0|1>", addr="<主节点地址>", port=29500) in (docs / "training.md").read_text()
    assert MULTI_NODE.format(rank="<0|1>", addr="<master address>", port=29500) in (docs / "training_en.md").read_text()


# ----------------------------------------------------------------------------------------------------------------------
# bad input: every Dataset class against fuzzed jsonl

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dataset import (BadLineError, DPODataset, PretrainDataset, PromptDataset, ReasonDataset,  # noqa: E402
                     SFTDataset)

text = st.text(min_size=1, max_size=40).filter(str.strip)
chat = st.lists(st.tuples(text, text), min_size=1, max_size=3).map(
    lambda turns: [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})])


def _good(kind):
    if kind == "pretrain":
        return st.one_of(text.map(lambda t: {"text": t}),
                         st.just({"text": "很长的文本 " * 20000}),  # a huge line: valid, truncated / packed
                         text.map(lambda t: {"text": t, "source": "extra keys are fine"}))
    if kind == "dpo":
        return st.tuples(chat, text, text).map(
            lambda c: {"chosen": c[0][:-1] + [{"role": "assistant", "content": c[1]}],
                       "rejected": c[0][:-1] + [{"role": "assistant", "content": c[2]}]})
    return chat.map(lambda c: {"conversations": c})


BAD = st.one_of(
    st.binary(min_size=1, max_size=60).filter(lambda b: b"\n" not in b and b.strip() and not b.strip().startswith(b"{")),
    st.just(b"\xff\xfe{\"text\": \"invalid utf-8\"}"),
    st.just(b'{"text": 5}'), st.just(b'{"text": "   "}'), st.just(b"{}"), st.just(b"[1, 2]"), st.just(b"null"),
    st.just(b'{"conversations": "not a list"}'),
    st.just(b'{"conversations": [{"role": "assistant", "content": "reply first"}, {"role": "user", "content": "q"}]}'),
    st.just(b'{"conversations": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}'),
    st.just(b'{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], '
            b'"rejected": [{"role": "user", "content": "OTHER"}, {"role": "assistant", "content": "c"}]}'),
    st.just(b'{"text": "unterminated'),
)

CLASSES = {"pretrain": lambda p, tok: PretrainDataset(p, tok, 32), "padded": lambda p, tok: PretrainDataset(
    p, tok, 32, packed=False), "sft": lambda p, tok: SFTDataset(p, tok, 32),
    "reason": lambda p, tok: ReasonDataset(p, tok, 32), "prompt": lambda p, tok: PromptDataset(p, tok, 16),
    "dpo": lambda p, tok: DPODataset(p, tok, 32)}


def _lines(kind):
    good = _good("pretrain" if kind in ("pretrain", "padded") else "dpo" if kind == "dpo" else "chat")
    line = st.one_of(good.map(lambda o: (json.dumps(o, ensure_ascii=False).encode(), True)),
                     BAD.map(lambda b: (b, False)))
    return st.lists(line, min_size=1, max_size=12)


@pytest.mark.parametrize("kind", list(CLASSES))
def test_fuzzed_jsonl_never_crashes_a_dataset_and_every_bad_line_is_named(kind, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp(kind)

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_lines(kind))
    def check(lines):
        path = folder / "data.jsonl"
        path.write_bytes(b"\n".join(raw for raw, _ in lines) + b"\n")
        for cache in folder.glob("data.jsonl.*"):
            cache.unlink()
        bad = [n for n, (_, ok) in enumerate(lines, start=1) if not ok]
        if len(bad) == len(lines):
            with pytest.raises(BadLineError, match="no usable lines"):
                CLASSES[kind](path, tokenizer)
            return
        data = CLASSES[kind](path, tokenizer)
        rows = getattr(data, "rows", None) or data.docs
        assert [r.split(": ")[0] for r in rows.bad_lines] == [f"{path}:{n}" for n in bad]
        for i in range(len(data)):
            item = data[i]
            for part in (item["chosen"], item["rejected"]) if kind == "dpo" else (item,):
                ids = part["input_ids"] if "input_ids" in part else part["prompt_ids"]  # GRPO prompts
                assert ids.ndim == 1 and 0 < len(ids) <= 32
                if "labels" in part:  # labels are the inputs or -100, never anything else
                    labelled = part["labels"] != -100
                    assert torch.equal(part["labels"][labelled], ids[labelled])
        if bad:
            with pytest.raises(BadLineError, match=f"--strict.*{path}:{bad[0]}:"):
                type(data)(path, tokenizer, strict=True)

    check()


def test_a_reply_truncated_away_teaches_nothing_and_is_counted(tmp_path, tokenizer, capsys):
    from dataset import pad_collate
    from trainer import count_label_tokens, lm_loss

    from helpers import make_model
    long_q = {"conversations": [{"role": "user", "content": "很长的问题" * 50}, {"role": "assistant", "content": "好"}]}
    short = {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}
    data = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [long_q, short]), tokenizer, 24)
    assert (data[0]["labels"] == -100).all() and (data[1]["labels"] != -100).any()
    model = make_model("tiny")
    both, alone = pad_collate([data[0], data[1]]), pad_collate([data[1]])
    grads = []
    for batch in (both, alone):
        model.zero_grad()
        loss, _ = lm_loss(model, batch)
        (loss / count_label_tokens(batch)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)  # the truncated row adds nothing to the update
    sft = load_script("2-sft.py")
    rows = [long_q, short] * 8
    sft.main(tiny_args(tmp_path, write_jsonl(tmp_path / "mixed.jsonl", rows), "--max_seq_len", 24, "--batch_size", 4,
                       "--max_steps", 4, "--from", "none"))
    assert "8 row(s) had no trainable token" in capsys.readouterr().out


def test_weights_that_do_not_fit_the_config_name_the_tensor(tmp_path):
    from helpers import make_model
    from model import MicroLMForCausalLM

    make_model("tiny").save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt/config.json").read_text())
    config["intermediate_size"] += 32  # the config now promises bigger MLPs than the weights hold
    (tmp_path / "ckpt/config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"wrong shapes: model\.layers\.\d+\.mlp\.\w+_proj\.weight \(checkpoint"):
        MicroLMForCausalLM.from_pretrained(tmp_path / "ckpt")


class _FailingNth:
    """A stand-in for a module (os or shutil) whose `name` function raises on its n-th call (power cut);
    `before` runs before every call of it."""

    def __init__(self, module, name, n, calls, before):
        self._module, self._name, self._n, self._calls, self._before = module, name, n, calls, before

    def __getattr__(self, attr):
        real = getattr(self._module, attr)
        if attr != self._name:
            return real

        def wrapper(*args, **kwargs):
            self._before()
            self._calls.append(attr)
            if len(self._calls) == self._n:
                raise KeyboardInterrupt(f"power cut in {attr} #{self._n}")
            return real(*args, **kwargs)
        return wrapper


@pytest.mark.slow
@pytest.mark.parametrize("module,name", [("os", "replace"), ("shutil", "rmtree")])
def test_a_fault_inside_the_real_checkpoint_swap_never_loses_a_complete_checkpoint(tmp_path, pretrain_file,
                                                                                  monkeypatch, module, name):
    """The real swap (_atomic_write_dir and friends), cut at its n-th os.replace / shutil.rmtree for every n that a
    run reaches: a complete folder is always found, only folders with the completeness marker are used, and the
    resumed run ends bit-identical to an uninterrupted one."""
    import shutil

    common = [*TINY, "--max_steps", 4, "--save_interval", 1]
    pretrain.main(tiny_args(tmp_path / "ref", pretrain_file, *common))
    real = {"os": os, "shutil": shutil}[module]
    cut = resumed_from = 0
    for n in range(1, 80):  # every call: a stride could keep hitting the same place in each save
        run = tmp_path / f"run{n}"
        calls, saved = [], [0]  # saved: the newest step a complete checkpoint held before the cut

        def note_complete(stage_dir=run / "out/pretrain"):
            found = ckpt.find_resume(stage_dir)
            if found is not None:
                saved[0] = max(saved[0], json.loads((found / "state.json").read_text())["step"])

        monkeypatch.setattr(ckpt, module, _FailingNth(real, name, n, calls, note_complete))
        try:
            pretrain.main(tiny_args(run, pretrain_file, *common))
        except KeyboardInterrupt:
            cut += 1
        finally:
            monkeypatch.setattr(ckpt, module, real)
        if len(calls) < n:  # this run never reached the n-th call: every later n is the same
            break
        stage_dir = run / "out/pretrain"
        found = ckpt.find_resume(stage_dir)  # None only when the cut came before the first save completed
        assert found is None or (found / ckpt.COMPLETE).exists(), sorted(p.name for p in stage_dir.iterdir())
        if saved[0]:  # a complete checkpoint existed before the cut: one at least as new is still there
            assert found is not None, (n, saved[0], sorted(p.name for p in stage_dir.iterdir()))
            assert json.loads((found / "state.json").read_text())["step"] >= saved[0]
        resumed_from += found is not None
        resumed = pretrain.main(tiny_args(run, pretrain_file, *common, "--resume"))
        assert resumed["steps"] == 4
        assert max_weight_diff(tmp_path / "ref/out/pretrain", stage_dir) == 0.0, n
    assert cut >= 2 and resumed_from >= 2  # runs really were cut at several points, and after saves


def test_a_resume_folder_without_its_completeness_marker_is_never_used(tmp_path):
    """A "resume" folder that lost its marker (copied half, or written by a tool that crashed) is skipped for the
    complete "resume.old"; with neither complete, nothing is resumed."""
    stage = tmp_path / "stage"
    for name, step, complete in (("resume", 6, False), ("resume.old", 4, True)):
        (stage / name).mkdir(parents=True)
        (stage / name / "state.json").write_text(json.dumps({"step": step}))
        if complete:
            (stage / name / ckpt.COMPLETE).write_text("ok\n")
    assert ckpt.find_resume(stage) == stage / "resume.old"
    (stage / "resume.old" / ckpt.COMPLETE).unlink()
    assert ckpt.find_resume(stage) is None
