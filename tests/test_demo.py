"""The README's first command: the demo pipeline trains every stage on CPU and each stage shows its effect."""

import json
import math

import pytest
from helpers import ROOT, load_script

from dataset.chat import normalize_chat
from dataset import read_jsonl
from demo.metrics import tool_use_scores
from demo.run import main as run_demo
from inference import run_tool


@pytest.mark.slow
def test_demo_pipeline_runs_every_stage_and_each_moves_its_held_out_metric(tmp_path):
    stages = ["pretrain", "sft", "tools", "kd", "dpo", "lora", "reason", "grpo", "agent"]
    results = run_demo(["--stages", ",".join(stages), "--out_dir", str(tmp_path / "out"),
                         "--image_dir", str(tmp_path / "images")])
    by_stage = {r["stage"]: r for r in results}
    for stage in stages:
        if stage in ("grpo", "agent"):  # RL: the reward is the curve (their loss sits near 0 by construction)
            continue
        r = by_stage[stage]  # losses are means over the first and the last 10 steps
        if stage == "dpo":  # lr 1e-6 (the sweep in docs/stages/dpo.md): the policy moves only a little away from log 2
            assert r["last_loss"] < min(r["first_loss"], math.log(2) - 0.01), r
        else:
            assert r["last_loss"] < r["first_loss"] - 0.5, r
        assert (tmp_path / "images" / f"{stage}_loss.png").stat().st_size > 5000
    assert (tmp_path / "images" / "grpo_reward.png").stat().st_size > 5000
    assert (tmp_path / "images" / "agent_reward.png").stat().st_size > 5000
    # SFT: on held-out questions the chat model answers and closes its turn; the pretrained model rambles on
    before, after = (by_stage[s]["metrics"] for s in ("pretrain", "sft"))
    assert after["held-out reply stop rate"] >= before["held-out reply stop rate"] + 0.5, (before, after)
    assert after["held-out QA accuracy"] >= before["held-out QA accuracy"]
    # tool use: held-out weather questions get a parsable call, and with the call run the answers are right far more
    # often than the same model's without tools (it cannot know the weather of a chat)
    tools = by_stage["tools"]["metrics"]
    assert tools["valid call"] >= 0.7, tools
    assert tools["answer accuracy with tools"] >= tools["answer accuracy without tools"] + 0.15, tools
    _tool_round_trips_through_the_server(tmp_path / "out" / "tools")
    _tool_calls_in_the_terminal_chat(tmp_path / "out" / "tools", tmp_path)
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
    # GRPO: 70% of the reasoning SFT traces skip the story's last event, so the reason model has two habits; the
    # correctness reward pays only for working through every event, and GRPO makes that the greedy habit: held-out
    # accuracy and reward rise by at least 0.1 (2-core EPYC: 0.10 -> 0.38 in bf16, 0.16 -> 0.47 in fp32), the format
    # holds
    grpo = by_stage["grpo"]["metrics"]
    assert grpo["answer accuracy"] >= grpo["answer accuracy before"] + 0.1, grpo
    assert grpo["mean reward"] >= grpo["mean reward before"] + 0.1, grpo
    assert grpo["format rate"] >= max(0.9, grpo["format rate before"] - 0.05), grpo
    # agentic RL: the tool-use SFT model already answers the held-out weather questions through the tool loop
    # (1.00 on the 2-core fp32 EPYC), so there is no gain to assert; RL must not break the calls or the answers
    agent = by_stage["agent"]["metrics"]
    assert agent["answer accuracy with tools"] >= agent["answer accuracy with tools before"] - 0.05, agent
    assert agent["valid call"] >= agent["valid call before"] - 0.05, agent
    saved = json.loads((tmp_path / "out" / "demo_results.json").read_text())
    assert [r["stage"] for r in saved] == stages
    # the report card: every stage's facts, the held-out loss of the stages with an eval file, the demo's scores
    card = (tmp_path / "out" / "report.md").read_text()
    assert all(f"| {stage} |" in card for stage in stages) and "| tools: valid call |" in card
    entries = json.loads((tmp_path / "out" / "report.json").read_text())
    held = {e["stage"]: e for e in entries if e["kind"] == "stage" and e["eval_bpb"] is not None}
    assert set(held) == {"pretrain", "sft", "kd", "lora", "reason"}
    assert (tmp_path / "images" / "report.png").stat().st_size > 10000


def _tool_round_trips_through_the_server(folder, n=12):
    """The trained demo model served with tools: the official openai client sends held-out weather questions with
    the tool's schema, gets tool_calls, runs them in the chat's scripted environment, sends the results back and
    reads the answers -- and these are exactly the answers of the tool-use evaluation (one round, greedy)."""
    from openai import OpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    server = load_script("scripts/serve_openai_api.py")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    items = read_jsonl(ROOT / "demo" / "data" / "tools_eval.jsonl")[:n]
    expected = tool_use_scores(model, tokenizer, items, max_rounds=1, return_generations=True)["generations"]
    answers, called = [], 0
    with server.serve_in_background(server.create_app(model, tokenizer, "demo-tools", max_tokens_cap=64)) as url:
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        for item in items:
            messages, tools = normalize_chat(item["conversations"], complete=False)
            messages = [m for m in messages if m["role"] != "system"]  # tools travel apart, as OpenAI's do
            first = client.chat.completions.create(model="demo-tools", messages=messages, tools=tools,
                                                   temperature=0, max_tokens=64).choices[0]
            if first.finish_reason == "tool_calls":
                called += 1
                messages.append(first.message.model_dump(exclude_none=True))
                env = {name: (lambda r: lambda **_: r)(r) for name, r in item["tool_results"].items()}
                messages += [{"role": "tool", "tool_call_id": c.id,
                              "content": run_tool(c.function.name, json.loads(c.function.arguments), env)}
                             for c in first.message.tool_calls]
                final = client.chat.completions.create(model="demo-tools", messages=messages, tools=tools,
                                                       temperature=0, max_tokens=64).choices[0]
                answers.append(final.message.content or "")
            else:
                answers.append(first.message.content or "")
    assert called >= n // 2  # the model does call its tool through the protocol
    assert answers == [turns[-1]["content"] for turns in expected]


def _tool_calls_in_the_terminal_chat(folder, tmp_path, n=40):
    """eval_model.py --tools file.py:get_weather on held-out questions: each call and its result is shown, and where
    the model called for the right city (or called nothing) the answers are the tool-use evaluation's (whose
    scripted environment answers every call with the chat's weather; the tool here knows the cities)."""
    import io

    items, cities = [], set()
    for item in read_jsonl(ROOT / "demo" / "data" / "tools_eval.jsonl"):  # one chat per city: the tool knows it
        if item["expected_call"]["arguments"]["city"] not in cities and len(items) < n:
            cities.add(item["expected_call"]["arguments"]["city"])
            items.append(item)
    weather = {i["expected_call"]["arguments"]["city"]: i["tool_results"]["get_weather"] for i in items}
    (tmp_path / "weather.py").write_text(
        f"WEATHER = {weather!r}\n\n\ndef get_weather(city: str) -> str:\n"
        f"    \"\"\"Today's weather in a city.\"\"\"\n    return WEATHER.get(city, 'unknown city')\n", encoding="utf-8")
    questions = [i["conversations"][-1]["content"] for i in items]
    (tmp_path / "q.txt").write_text("\n".join(questions) + "\n", encoding="utf-8")
    out = io.StringIO()
    answers = load_script("eval_model.py").main(
        ["--model_path", str(folder), "--prompts", str(tmp_path / "q.txt"), "--temperature", "0", "--dtype",
         "float32", "--max_new_tokens", "64", "--max_tool_rounds", "1",
         "--tools", f"{tmp_path / 'weather.py'}:get_weather"],
        out=out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    expected = tool_use_scores(model, tokenizer, items, max_rounds=1, return_generations=True)["generations"]
    shown = out.getvalue()
    assert "[tool call] get_weather(" in shown and "[tool result] " in shown
    same_result = [not turns[0].get("tool_calls") or all(
        json.loads(c["function"]["arguments"]) == item["expected_call"]["arguments"] for c in turns[0]["tool_calls"])
        for turns, item in zip(expected, items)]
    assert sum(same_result) >= 2
    assert [a for a, same in zip(answers, same_result) if same] == \
        [turns[-1]["content"] for turns, same in zip(expected, same_result) if same]
