"""Checkpoints: the model folder `out/<stage>/` (from_pretrained-loadable) and the resume state `out/<stage>/resume/`.

Every write goes to a temporary name first and is renamed into place, and the resume folder only counts once its
COMPLETE marker exists, so a crash mid-save never destroys or impersonates the last good checkpoint.
"""

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from common.resolve import WEIGHTS

COMPLETE = "COMPLETE"
SHARDED = "dcp"  # --fsdp: weights and optimizer state as torch.distributed.checkpoint shards, one file per rank


def _atomic_write_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written folder into place; the previous one survives until the new one is in."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def save_pretrained_atomic(model, tokenizer, out_dir) -> None:
    """save_pretrained into a temporary folder, then move each file into out_dir with an atomic rename."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".saving"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == WEIGHTS):  # weights last
        os.replace(f, out_dir / f.name)
    tmp.rmdir()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_tmp_dir(stage_dir) -> Path:
    return Path(stage_dir) / "resume.tmp"


def write_rank_rng(stage_dir, rank: int) -> None:
    """Every rank writes its own RNG state into the folder being prepared (before rank 0 commits it)."""
    tmp = resume_tmp_dir(stage_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")


def clear_resume_tmp(stage_dir, is_main: bool) -> None:
    """Rank 0 removes what a torn save left in the folder being prepared (the others wait at a barrier)."""
    tmp = resume_tmp_dir(stage_dir)
    if is_main and tmp.exists():
        shutil.rmtree(tmp)


def commit_resume(stage_dir, state: dict, model=None, optimizer=None, scaler=None) -> None:
    """Rank 0: write weights, optimizer, scaler (unless the ranks wrote theirs as shards) and the json state next
    to the RNG files, then swap it in."""
    stage_dir = Path(stage_dir)
    tmp = resume_tmp_dir(stage_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    if model is not None:
        save_model(model, str(tmp / WEIGHTS))  # handles the tied embedding / lm_head tensor
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    (tmp / COMPLETE).write_text("ok\n")
    _atomic_write_dir(tmp, stage_dir / "resume")


def find_resume(stage_dir) -> Path | None:
    """The newest complete resume folder (an interrupted swap leaves it as resume.old), or None."""
    for name in ("resume", "resume.old"):
        path = Path(stage_dir) / name
        if (path / COMPLETE).exists():
            return path
    return None


def load_resume(path, model, optimizer, scaler, rank: int) -> dict:
    """Restore a resume folder into this run; a sharded one (--fsdp) into any number of ranks."""
    from . import fsdp

    if (Path(path) / SHARDED).is_dir():
        fsdp.load_resume(Path(path) / SHARDED, model, optimizer)
    elif fsdp.is_sharded(model):
        raise SystemExit(f"{path} was written without --fsdp: resume it without --fsdp (same number of ranks or not), "
                         f"or start this sharded run from its weights with --from {Path(path).parent}")
    else:
        load_model(model, str(Path(path) / WEIGHTS), strict=True)
        optimizer.load_state_dict(torch.load(Path(path) / "optimizer.pt", weights_only=True))
    if scaler is not None and (Path(path) / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(Path(path) / "scaler.pt", weights_only=True))
    rng_file = Path(path) / f"rng_rank{rank}.pt"
    if rng_file.exists():  # absent when resuming with more ranks than were saved: those start fresh RNG streams
        set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((Path(path) / "state.json").read_text())
