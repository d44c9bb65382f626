"""Run a stage script with AdamW.step patched to save, before the first step, the raw gradients it is about to
apply and each parameter's weight decay (one file per rank), for tests/test_trainer.py's gradient-level checks.

    python tests/helpers/grad_dump.py OUT_PREFIX SCRIPT [stage args...]      -> OUT_PREFIX.rank0.pt
    torchrun --nproc_per_node 2 tests/helpers/grad_dump.py OUT_PREFIX SCRIPT ...  -> .rank0.pt, .rank1.pt

Gradients are saved in the optimizer's parameter order (trainer.engine.param_groups), after DDP's all-reduce and
clipping, i.e. exactly what the step uses.
"""

import importlib.util
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

out_prefix, script, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
_step = torch.optim.AdamW.step


def _dumping_step(self, *args, **kwargs):
    if not getattr(self, "_grads_dumped", False):
        grads = [p.grad.detach().clone() for group in self.param_groups for p in group["params"]]
        decay = [group["weight_decay"] for group in self.param_groups for _ in group["params"]]
        torch.save({"grads": grads, "weight_decay": decay}, f"{out_prefix}.rank{os.environ.get('RANK', '0')}.pt")
        self._grads_dumped = True
    return _step(self, *args, **kwargs)


torch.optim.AdamW.step = _dumping_step
spec = importlib.util.spec_from_file_location("stage", ROOT / script)
stage = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stage)
stage.main(argv)
