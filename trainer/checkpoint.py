"""Checkpoints: the model folder `out/<stage>/` (from_pretrained-loadable) and the resume state `out/<stage>/resume/`.

Every write goes to a temporary name first and is renamed into place, and the resume folder only counts once its
COMPLETE marker exists, so a crash mid-save never destroys or impersonates the last good checkpoint.
"""

import contextlib
import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

STAGE_SCRIPTS = {"pretrain": "1-pretrain.py", "sft": "2-sft.py", "kd": "3-KD.py", "dpo": "4-RLHF.py",
                 "lora": "5-LoRA.py", "reason": "6-reason.py", "grpo": "6-reason.py --method grpo",
                 "ppo": "4-RLHF.py --method ppo", "agent": "6-reason.py --method agent",
                 # tool-use SFT on top of sft, saved beside it (scripts/run_demo.py's tools stage)
                 "tools": "2-sft.py --from sft --save_as tools --data_path <tool-call chats>"}
WEIGHTS = "model.safetensors"
COMPLETE = "COMPLETE"


def resolve_checkpoint(name_or_path, out_root="out") -> Path:
    """A stage name (`sft` -> out/sft), a checkpoint folder (ours, Hugging Face Llama / Qwen / Mixtral, MiniMind's)
    or a MiniMind `.pth` state dict (model/families.py); a clear error otherwise."""
    from model.families import is_checkpoint

    path = Path(name_or_path)
    if not path.exists() and str(name_or_path) in STAGE_SCRIPTS:
        path = Path(out_root) / str(name_or_path)
    if is_checkpoint(path):
        return path
    stage = str(name_or_path) if str(name_or_path) in STAGE_SCRIPTS else None
    made_by = f"; it is made by `python {STAGE_SCRIPTS[stage]}`" if stage else ""
    raise FileNotFoundError(f"no checkpoint at {path} (looked for {path / 'config.json'} and {path / WEIGHTS}, or a "
                            f".pth / .bin / .safetensors state dict){made_by}")


def checkpoint_tokenizer(path, tokenizer_arg=None, default=None) -> Path:
    """The tokenizer that goes with the checkpoint at `path`: --tokenizer if given, else the one saved beside it,
    else (our own checkpoints only) `default`. A foreign checkpoint without one is an error: another tokenizer's ids
    would silently mean other tokens."""
    from model.families import model_type

    path = Path(path)
    if tokenizer_arg is not None:
        return Path(tokenizer_arg)
    if path.is_dir() and (path / "tokenizer_config.json").exists():
        return path
    if (path / "adapter_config.json").exists():  # an adapter without its own: the base's
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if base and Path(base).exists():
            return checkpoint_tokenizer(base, None, default)
        if default is not None:
            return Path(default)
    if path.is_dir() and (path / "config.json").exists() and model_type(path) in ("microlm", None) and default:
        return Path(default)
    raise SystemExit(f"{path} has no tokenizer beside it: give --tokenizer (for MiniMind's checkpoints, the folder "
                     f"with MiniMind's tokenizer.json and tokenizer_config.json)")


def resolve_tokenizer(tokenizer_arg, init_from=None, out_root="out", default=None) -> Path:
    """The tokenizer a run uses: --tokenizer if given, else the one saved beside the --from checkpoint (every stage
    saves it), else `default` (ours). A --tokenizer whose vocabulary differs from the checkpoint's is an error:
    the embeddings were trained for the saved one."""
    saved = None
    if init_from and str(init_from).lower() != "none":
        with contextlib.suppress(FileNotFoundError):  # a missing checkpoint is reported where the model is built
            path = resolve_checkpoint(init_from, out_root)
            if tokenizer_arg is None:
                return checkpoint_tokenizer(path, None, default)
            saved = path if (path / "tokenizer_config.json").exists() else None
    if tokenizer_arg is None:
        return Path(default)
    if saved is not None and Path(tokenizer_arg).resolve() != saved.resolve():
        from transformers import AutoTokenizer

        given, kept = AutoTokenizer.from_pretrained(tokenizer_arg), AutoTokenizer.from_pretrained(saved)
        if given.get_vocab() != kept.get_vocab():
            raise SystemExit(f"--tokenizer {tokenizer_arg} does not match the tokenizer the checkpoint {saved} was "
                             f"trained with ({len(given)} vs {len(kept)} tokens, or other ids); leave --tokenizer out "
                             f"to use the checkpoint's")
    return Path(tokenizer_arg)


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


def commit_resume(stage_dir, model, optimizer, scaler, state: dict) -> None:
    """Rank 0: write weights, optimizer, scaler and the json state next to the RNG files, then swap it in."""
    stage_dir = Path(stage_dir)
    tmp = resume_tmp_dir(stage_dir)
    tmp.mkdir(parents=True, exist_ok=True)
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
    load_model(model, str(Path(path) / WEIGHTS), strict=True)
    optimizer.load_state_dict(torch.load(Path(path) / "optimizer.pt", weights_only=True))
    if scaler is not None and (Path(path) / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(Path(path) / "scaler.pt", weights_only=True))
    rng_file = Path(path) / f"rng_rank{rank}.pt"
    if rng_file.exists():  # absent when resuming with more ranks than were saved: those start fresh RNG streams
        set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((Path(path) / "state.json").read_text())
