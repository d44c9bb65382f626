import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import MicroLMConfig, MicroLMForCausalLM  # noqa: E402


def make_model(preset="tiny", seed=0, **overrides) -> MicroLMForCausalLM:
    torch.manual_seed(seed)
    return MicroLMForCausalLM(MicroLMConfig.from_preset(preset, **overrides)).eval()


@pytest.fixture
def tiny_model():
    return make_model("tiny")


def random_ids(batch, length, seed=0, vocab=6400):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)  # skip the special ids 0-2
