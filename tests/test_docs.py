"""Docs that cannot rot: --help shows every default, docs/flags.md is the parsers' own text, every command in the
README and docs/ uses real flags, every link and image exists, every stage has its page, and the recipe's tiny mode
runs the real path on the demo data."""

import argparse
import os
import re
import subprocess

import pytest
from helpers import ROOT

from inference.load import TEST_PROMPTS
from scripts import check_docs, flags_doc

STAGE_PAGES = ["pretrain", "sft", "kd", "dpo", "ppo", "lora", "reason", "grpo", "agent"]


def test_the_flags_page_is_what_the_parsers_print():
    page = (ROOT / "docs/flags.md").read_text(encoding="utf-8")
    if f"Python {flags_doc.PYTHON})" not in page:
        pytest.skip(f"docs/flags.md was laid out by another Python's argparse than {flags_doc.PYTHON}")
    assert page == flags_doc.render(), \
        "docs/flags.md is stale: run python scripts/flags_doc.py"


def test_every_option_shows_its_default_in_help():
    for entry in flags_doc.ENTRY_POINTS:
        parser = flags_doc.parser_of(entry)
        for p in [parser, *flags_doc.subparsers(parser).values()]:
            options = [a for a in p._actions if a.option_strings and a.default is not argparse.SUPPRESS
                       and a.dest != "help" and a.help is not argparse.SUPPRESS]
            assert flags_doc.help_text(p).count("(default:") >= len(options), p.prog


def test_every_doc_command_flag_link_and_image_is_real():
    assert check_docs.problems() == []


def test_the_checks_see_a_wrong_flag_a_dead_link_and_a_missing_image(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# p\n[ok](page.md) [gone](nope.md)\n![fig](images/none.png)\n"
                    "Run `python 2-sft.py --data_path x --no_such_flag 1`.\n"
                    "```bash\ntorchrun --nproc_per_node 4 1-pretrain.py --epochs 1 \\\n  --bogus 2\n"
                    "python data_process.py stats f --sample 3 --list\n```\n", encoding="utf-8")
    assert check_docs.problems([page]) == [
        f"{page}:2: link or image 'nope.md' does not exist",
        f"{page}:3: link or image 'images/none.png' does not exist",
        f"{page}:4: 2-sft.py has no flag --no_such_flag",
        f"{page}:6: 1-pretrain.py has no flag --bogus",
        f"{page}:8: data_process.py has no flag --list"]  # --list belongs to `download`, not to `stats`


def test_the_front_page_is_short_and_every_stage_has_its_page():
    for name in ("README.md", "README_en.md"):
        text = (ROOT / name).read_text(encoding="utf-8")
        assert len(text.splitlines()) <= 300, name
        first_block = text.split("```bash", 1)[1].split("```", 1)[0]
        assert "python3 -m demo" in first_block and "python3 -m pytest -q" in first_block, name
    zh = (ROOT / "README.md").read_text(encoding="utf-8")
    assert zh.index("## 快速开始") < zh.index("```bash")  # the two commands are the first block under 快速开始
    for stage in STAGE_PAGES:
        for page in (f"docs/stages/{stage}.md", f"docs/stages/{stage}_en.md"):
            text = (ROOT / page).read_text(encoding="utf-8")
            assert "$$" in text, f"{page}: the objective as a formula"
            assert "![" in text, f"{page}: a curve"
            assert re.search(r"\|\s*`--\w+", text), f"{page}: a defaults table"
            samples = text.split("<!-- samples:begin -->", 1)[1].split("<!-- samples:end -->", 1)[0]
            assert samples.count("|") > 10, f"{page}: before/after samples (python -m demo.samples)"
            assert f"stages/{stage}.md" in zh, f"README.md links {page}"


def test_no_run_history_on_the_front_pages():
    for name in ("README.md", "README_en.md"):
        text = (ROOT / name).read_text(encoding="utf-8")
        assert not re.search(r"上一次|之前的运行|重测|previous run|last run|issue \d+", text, re.I), name


@pytest.mark.slow
def test_the_recipes_tiny_mode_runs_the_default_path_and_chats(tmp_path):
    """The shortest real path (STAGES left at its default: pretrain, SFT, then the chat check) with TINY=1; every other
    stage's command in the script is checked against its parser by the docs test above."""
    out = tmp_path / "out"
    env = {**os.environ, "TINY": "1", "OUT": str(out), "OMP_NUM_THREADS": "1"}
    env.pop("STAGES", None)
    run = subprocess.run(["bash", "scripts/recipe.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for stage in ("pretrain", "sft"):
        assert (out / stage / "model.safetensors").exists(), stage
    assert (out / "images" / "sft_loss.png").exists()  # curves beside the run, not over the repository's figures
    assert run.stdout.count('"tokens_estimate"') == 2  # the token counts of the recipe's table, for both files
    assert "initialised from" in run.stderr + run.stdout  # SFT started from the pretrained model
    for prompt in TEST_PROMPTS:  # the chat check at the end answered every built-in question
        assert prompt in run.stdout


def test_the_recipe_refuses_a_chain_with_a_missing_link(tmp_path):
    env = {**os.environ, "TINY": "1", "OUT": str(tmp_path / "out"), "STAGES": "pretrain reason"}
    run = subprocess.run(["bash", "scripts/recipe.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "reason starts from" in run.stderr and "'dpo'" in run.stderr, run.stderr
