"""Fixtures every test file may use; the shared helpers are in tests/helpers (`from helpers import ...`)."""

import pytest

from helpers import barely_trained, make_model, pretrain_rows, sft_rows, write_jsonl


def pytest_collection_modifyitems(items):
    for item in items:  # a slow test is an end-to-end test too: -m "not e2e" leaves both out
        if item.get_closest_marker("slow") and not item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def fresh_row_warnings(monkeypatch):
    """Each test sees its rows' warnings: the per-process limit on them (dataset/jsonl.py) starts again."""
    import dataset.jsonl

    monkeypatch.setattr(dataset.jsonl, "_WARNED", {})


@pytest.fixture
def tiny_model():
    return make_model("tiny")


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from model import TOKENIZER_DIR

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="session")
def start(tmp_path_factory):
    """A barely trained tiny model to run RL from, built once per test run (tests read it, never write to it)."""
    return barely_trained(tmp_path_factory.mktemp("start"))


@pytest.fixture
def pretrain_file(tmp_path):
    return write_jsonl(tmp_path / "pretrain.jsonl", pretrain_rows())


@pytest.fixture
def sft_file(tmp_path):
    return write_jsonl(tmp_path / "sft.jsonl", sft_rows())
