"""1-pretrain.py's stage with a fault injected on one rank, for tests/test_reliability.py (run under torchrun).

    FAULT=nan:CALL:RANK     the loss of the CALL-th micro-batch on RANK is NaN
    FAULT=raise:CALL:RANK   the CALL-th micro-batch on RANK raises
"""

import importlib.util
import os
from pathlib import Path

from dataset import PretrainDataset
from trainer import lm_loss, stage_main

ROOT = Path(__file__).resolve().parents[2]

spec = importlib.util.spec_from_file_location("pretrain_stage", ROOT / "1-pretrain.py")
pretrain = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pretrain)
kind, at_call, on_rank = os.environ["FAULT"].split(":")


def run(trainer, args):
    model = trainer.build_model()
    data = PretrainDataset(args.data_path, trainer.tokenizer, args.max_seq_len)
    calls = []

    def loss_fn(model, batch):
        loss, metrics = lm_loss(model, batch)
        calls.append(1)
        if len(calls) == int(at_call) and trainer.env.rank == int(on_rank):
            if kind == "raise":
                raise RuntimeError(f"injected fault on rank {on_rank}")
            loss = loss * float("nan")
        return loss, metrics

    return trainer.fit(model, data, loss_fn=loss_fn)


if __name__ == "__main__":
    stage_main("pretrain", pretrain.build_parser, run)
