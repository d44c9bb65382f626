"""A quiet start: an entry point's first lines are ours. On a clean install transformers imported torchao at start-up,
which printed failed CUDA-kernel loads and torch's pytree deprecations before anything of ours (model/quiet.py)."""

import subprocess
import sys

import pytest

from helpers import ROOT

# each in its own process, as a user starts them: a training stage (the six share one import path), the server
# (inference and FastAPI) and the demo runner (every layer)
ENTRY_POINTS = [["1-pretrain.py"], ["scripts/serve_openai_api.py"], ["-m", "demo"]]


@pytest.mark.e2e
def test_every_entry_point_starts_without_foreign_lines_on_stderr():
    running = []
    for entry in ENTRY_POINTS:  # two at a time: two cores
        running.append((entry, subprocess.Popen([sys.executable, *entry, "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, text=True)))
        if len(running) >= 2:
            _check(*running.pop(0))
    for entry, proc in running:
        _check(entry, proc)


def _check(entry, proc):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (entry, err[-2000:])
    assert "usage:" in out, entry
    assert err == "", f"{' '.join(entry)} --help wrote to stderr:\n{err[:2000]}"


@pytest.mark.e2e
def test_torchao_still_builds_the_lean_optimizers_quietly():
    """--optim adamw8bit imports torchao where it is needed, without its start-up notices."""
    code = ("import sys; from model import MicroLMConfig, MicroLMForCausalLM; assert 'torchao' not in sys.modules; "
            "from trainer.optim import build_optimizer; "
            "m = MicroLMForCausalLM(MicroLMConfig.from_preset('tiny')); "
            "print(type(build_optimizer('adamw8bit', [{'params': list(m.parameters())}], 1e-3)).__name__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "AdamW8bit" in proc.stdout
    assert proc.stderr == "", proc.stderr[:2000]
