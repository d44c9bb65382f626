"""The README's first command: the demo pipeline trains every stage on CPU and each stage shows its effect."""

import json

import pytest
from conftest import load_script


@pytest.mark.slow
def test_demo_pipeline_stages_1_and_2_and_sft_answers_held_out_questions_where_pretrain_rambles(tmp_path):
    demo = load_script("scripts/run_demo.py")
    results = demo.main(["--stages", "pretrain,sft", "--out_dir", str(tmp_path / "out"),
                         "--image_dir", str(tmp_path / "images")])
    by_stage = {r["stage"]: r for r in results}
    for stage in ("pretrain", "sft"):
        r = by_stage[stage]
        assert r["last_loss"] < r["first_loss"] - 1.0, r
        assert (tmp_path / "images" / f"{stage}_loss.png").stat().st_size > 5000
    # on held-out questions the SFT model answers and closes its turn; the pretrained model rambles on
    before, after = (by_stage[s]["metrics"] for s in ("pretrain", "sft"))
    assert after["held-out reply stop rate"] >= before["held-out reply stop rate"] + 0.5, (before, after)
    assert after["held-out QA accuracy"] >= before["held-out QA accuracy"]
    saved = json.loads((tmp_path / "out" / "demo_results.json").read_text())
    assert [r["stage"] for r in saved] == ["pretrain", "sft"]
