"""Which checkpoint and which tokenizer a name means: a stage name (`sft` -> out/sft), a folder, a MiniMind .pth.

Shared by training (`--from`), the inference loaders and the export, with the same errors everywhere.
"""

import contextlib
import json
from pathlib import Path

from model.families import is_checkpoint, model_type

STAGE_SCRIPTS = {"pretrain": "1-pretrain.py", "sft": "2-sft.py", "kd": "3-KD.py", "dpo": "4-RLHF.py",
                 "lora": "5-LoRA.py", "reason": "6-reason.py", "grpo": "6-reason.py --method grpo",
                 "ppo": "4-RLHF.py --method ppo", "agent": "6-reason.py --method agent",
                 # tool-use SFT on top of sft, saved beside it (the demo's tools stage, demo/run.py)
                 "tools": "2-sft.py --from sft --save_as tools --data_path <tool-call chats>"}
WEIGHTS = "model.safetensors"


def resolve_checkpoint(name_or_path, out_root="out") -> Path:
    """A stage name (`sft` -> out/sft) or a --save_as name under out_root, a checkpoint folder (ours, Hugging Face Llama / Qwen / Mixtral, MiniMind's)
    or a MiniMind `.pth` state dict (model/families.py); a clear error otherwise."""
    path = Path(name_or_path)
    # a bare name is a stage's output, or any run's --save_as NAME, under out_root
    if not path.exists() and len(path.parts) == 1 and (str(path) in STAGE_SCRIPTS or (Path(out_root) / path).exists()):
        path = Path(out_root) / path
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
