"""Run a stage script under torchrun and let every rank write the weights it ends with (tests/test_ppo.py: DDP keeps
the policy and the value model identical on all ranks).

    torchrun --nproc_per_node 2 tests/helpers/rank_weights.py OUT_DIR SCRIPT [stage args...]
"""

import importlib.util
import sys
from pathlib import Path

import torch

from trainer.engine import Trainer

ROOT = Path(__file__).resolve().parents[2]

out_dir, script, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
fit = Trainer.fit


def fit_and_dump(self, model, *args, **kwargs):
    summary = fit(self, model, *args, **kwargs)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out_dir / f"rank{self.env.rank}.pt")
    return summary


Trainer.fit = fit_and_dump
spec = importlib.util.spec_from_file_location("stage", ROOT / script)
stage = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stage)
stage.main(argv)
