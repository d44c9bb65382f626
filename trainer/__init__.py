"""The training side: the one engine every stage uses (engine.py) and the methods the stage scripts choose with
--method, one module each (dpo, ppo, grpo, agent, kd), over what they share (rl.py, rewards.py)."""

from common.distributed import print0
from .engine import Trainer, add_train_args, count_label_tokens, lm_loss, lr_at, stage_main
from . import agent, dpo, grpo, kd, ppo  # the methods, on top of the engine

__all__ = ["agent", "dpo", "grpo", "kd", "ppo", "Trainer", "add_train_args", "count_label_tokens", "lm_loss", "lr_at", "print0", "stage_main"]
