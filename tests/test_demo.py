"""The README's first command: the demo pipeline trains every stage on CPU and each stage shows its effect."""

import json
import math

import pytest
from conftest import load_script


@pytest.mark.slow
def test_demo_pipeline_runs_every_stage_and_each_moves_its_held_out_metric(tmp_path):
    demo = load_script("scripts/run_demo.py")
    stages = ["pretrain", "sft", "tools", "kd", "dpo", "lora", "reason", "grpo"]
    results = demo.main(["--stages", ",".join(stages), "--out_dir", str(tmp_path / "out"),
                         "--image_dir", str(tmp_path / "images")])
    by_stage = {r["stage"]: r for r in results}
    for stage in stages[:-1]:
        r = by_stage[stage]  # losses are means over the first and the last 10 steps
        if stage == "dpo":  # lr 1e-6 (the README's sweep): the policy moves only a little away from log 2
            assert r["last_loss"] < min(r["first_loss"], math.log(2) - 0.01), r
        else:
            assert r["last_loss"] < r["first_loss"] - 0.5, r
        assert (tmp_path / "images" / f"{stage}_loss.png").stat().st_size > 5000
    assert (tmp_path / "images" / "grpo_reward.png").stat().st_size > 5000
    # SFT: on held-out questions the chat model answers and closes its turn; the pretrained model rambles on
    before, after = (by_stage[s]["metrics"] for s in ("pretrain", "sft"))
    assert after["held-out reply stop rate"] >= before["held-out reply stop rate"] + 0.5, (before, after)
    assert after["held-out QA accuracy"] >= before["held-out QA accuracy"]
    # tool use: held-out weather questions get a parsable call, and with the call run the answers are right far more
    # often than the same model's without tools (it cannot know the weather of a chat)
    tools = by_stage["tools"]["metrics"]
    assert tools["valid call"] >= 0.7, tools
    assert tools["answer accuracy with tools"] >= tools["answer accuracy without tools"] + 0.15, tools
    # KD: the student predicts the teacher's answers to questions it never trained on far better than before
    kd = by_stage["kd"]["metrics"]
    assert kd["teacher-answer loss"] < kd["teacher-answer loss before"] - 2.0, kd
    # DPO: on held-out pairs the policy moved chosen above rejected relative to where it started (0 at the start:
    # every margin is 0 there), and its own preferences did not get worse
    dpo = by_stage["dpo"]["metrics"]
    assert dpo["reward accuracy"] >= 0.6, dpo
    assert dpo["preference accuracy"] >= dpo["preference accuracy before"] - 0.02, dpo
    # LoRA: the medical adapter sends held-out patients to the right department far more often than the base
    lora = by_stage["lora"]["metrics"]
    assert lora["department accuracy"] >= lora["department accuracy before"] + 0.25, lora
    # reasoning SFT: held-out word problems get answered in the <think>/<answer> format
    reason = by_stage["reason"]["metrics"]
    assert reason["format rate"] >= 0.8 and reason["format rate before"] <= 0.1, reason
    # GRPO: the mean reward on held-out problems does not fall below where it started
    grpo = by_stage["grpo"]["metrics"]
    assert grpo["mean reward"] >= grpo["mean reward before"] - 0.05, grpo
    saved = json.loads((tmp_path / "out" / "demo_results.json").read_text())
    assert [r["stage"] for r in saved] == stages
