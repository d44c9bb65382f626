"""The training engine shared by every stage (see engine.py)."""

from .distributed import print0
from .engine import Trainer, add_train_args, count_label_tokens, lm_loss, lr_at, stage_main

__all__ = ["Trainer", "add_train_args", "count_label_tokens", "lm_loss", "lr_at", "print0", "stage_main"]
