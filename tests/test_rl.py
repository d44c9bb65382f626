"""Reinforcement learning, complete (issue 17): GRPO's iterations, refusals and rewards, reward models, the MoE
balance loss in DPO / GRPO."""

import json

import pytest
import torch
from helpers import ROOT, load_script, make_model, tiny_args, write_jsonl

from trainer import agent as agent_method
from trainer import dpo as dpo_method
from trainer.rewards import RewardModel, call_reward, correctness_reward, load_reward
from inference.tools import scripted_tool
from trainer import rl

reason = load_script("6-reason.py")
dpo = load_script("4-RLHF.py")
DEMO = ROOT / "demo" / "data"
GRPO = ("--method", "grpo", "--batch_size", 2, "--num_generations", 4, "--max_new_tokens", 8)


def test_a_group_of_one_is_refused_with_the_reason(tmp_path, start):
    with pytest.raises(SystemExit, match="group of one"):
        reason.main(tiny_args(tmp_path, DEMO / "reason_prompts.jsonl", *GRPO, "--from", start,
                              "--num_generations", 1))


def test_more_iterations_per_rollout_move_the_ratio_off_1_and_the_clip_acts(tmp_path, start):
    """num_iterations 1: every update is on-policy (ratio 1, nothing clipped). num_iterations 3: from the second
    step on a batch the policy has moved, so with a tight clip some tokens are clipped; the first step of each
    batch is on-policy again (the sampling policy's log-probs, at the same temperature, equal the policy's)."""
    (tmp_path / "length.py").write_text("def length(completion, reference):\n    return float(len(completion))\n")
    common = (*GRPO, "--from", start, "--loss_type", "grpo", "--clip_eps", 0.01, "--learning_rate", 5e-3,
              "--temperature", 0.7, "--log_interval", 1, "--reward", f"{tmp_path / 'length.py'}:length")
    one = reason.main(tiny_args(tmp_path / "one", DEMO / "reason_prompts.jsonl", *common, "--max_steps", 2))
    assert [m["clip_ratio"] for _, m in one["metric_history"]] == [0.0, 0.0]
    three = reason.main(tiny_args(tmp_path / "three", DEMO / "reason_prompts.jsonl", *common, "--max_steps", 6,
                                  "--num_iterations", 3))
    clip = [m["clip_ratio"] for _, m in three["metric_history"]]
    assert len(clip) == 6 and clip[0] == 0.0 and clip[3] == 0.0, clip  # each rollout batch's first step
    assert max(clip[1], clip[2]) > 0 and max(clip[4], clip[5]) > 0, clip
    # the same rollouts serve the three steps: their rewards repeat
    rewards = [m["reward"] for _, m in three["metric_history"]]
    assert rewards[0] == rewards[1] == rewards[2] and rewards[3] == rewards[4] == rewards[5]


def test_rewards_see_the_prompt_and_the_older_two_argument_form_keeps_working(tmp_path):
    (tmp_path / "mine.py").write_text(
        "def asks(prompt, completion, reference):\n"
        "    return float(len(prompt[-1]['content'])) + (reference == 'r')\n"
        "def old(completion, reference):\n"
        "    return float(len(completion))\n")
    prompt = [{"role": "user", "content": "abc"}]
    assert call_reward(load_reward(f"{tmp_path / 'mine.py'}:asks"), prompt, "xy", "r") == 4.0
    assert call_reward(load_reward(f"{tmp_path / 'mine.py'}:old"), prompt, "xy", "r") == 2.0
    scores = rl.score_rewards([load_reward("correctness"), load_reward(f"{tmp_path / 'mine.py'}:asks")],
                                  [2.0, 1.0], [prompt, prompt], ["<answer>8</answer>", "8"], ["8", None])
    assert scores.tolist() == [[2.0, 3.0], [0.0, 3.0]]  # weighted; correctness skips the row without a reference


def test_correctness_matches_numbers_or_normalised_text_and_never_raises():
    assert correctness_reward("<answer>Paris.</answer>", "paris") == 1.0
    assert correctness_reward("<think>hmm</think>The Great Wall", ["长城", "the great wall"]) == 1.0
    assert correctness_reward("<answer>Lyon</answer>", "Paris") == 0.0
    assert correctness_reward("<answer>3.50 元</answer>", "3.5") == 1.0
    for reference in (None, "", [], ["", None], {"a": 1}, 7, 2.5, "<answer></answer>"):
        assert correctness_reward("<answer>7</answer>", reference) in (0.0, 1.0)


def test_prompt_only_rows_say_which_rewards_apply_and_stop_when_none_does(tmp_path, start, capsys):
    rows = [{"conversations": [{"role": "user", "content": f"写一句关于{x}的话"}, {"role": "assistant", "content": ""}]}
            for x in "春夏秋冬"] * 2
    data = write_jsonl(tmp_path / "rlaif.jsonl", rows)
    with pytest.raises(SystemExit, match="every reward \\(correctness\\) needs one"):
        reason.main(tiny_args(tmp_path, data, *GRPO, "--from", start, "--reward", "correctness", "--max_steps", 1))
    reason.main(tiny_args(tmp_path, data, *GRPO, "--from", start, "--reward", "format,correctness",
                          "--max_steps", 1))
    assert "on them only format score (correctness need a reference)" in capsys.readouterr().out


def test_thinking_ratio_renders_that_share_of_prompts_with_thinking_on(tmp_path, tokenizer):
    from dataset import PromptDataset

    rows = [{"conversations": [{"role": "user", "content": f"q{i}"}]} for i in range(200)]
    data = PromptDataset(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer, thinking_ratio=0.9, seed=1)
    opened = [data[i]["opened"] for i in range(len(data))]
    assert 0.8 < sum(opened) / len(opened) < 0.97
    assert all(tokenizer.decode(data[i]["prompt_ids"]).endswith("<think>\n\n</think>\n\n")
               for i in range(len(data)) if not opened[i])


def test_padded_prompts_sample_and_score_as_each_prompt_alone_and_long_ones_keep_their_end(tmp_path, tokenizer,
                                                                                           caplog):
    """The RL path (PromptDataset -> prompt_collate -> the decode loop -> token_logps): prompts of different lengths
    in one left-padded batch get the greedy replies and the log-probs of those replies that each gets alone; a prompt
    over --max_prompt_len keeps its end (the question and the generation prompt) and is reported."""
    import logging

    from dataset import PromptDataset, prompt_collate
    from inference import Sampling, generate

    questions = ["1+1?", "一个长得多的问题：3 乘 4 再加 5 等于多少？请一步一步算一算。", "嗨"]
    path = write_jsonl(tmp_path / "p.jsonl", [{"conversations": [{"role": "user", "content": q}]} for q in questions])
    items = [PromptDataset(path, tokenizer)[i] for i in range(3)]
    batch = prompt_collate(items, pad_id=tokenizer.pad_token_id)
    model, eos, pad = make_model("tiny", seed=1), tokenizer.eos_token_id, tokenizer.pad_token_id
    greedy = Sampling(max_new_tokens=6)
    completion = generate(model, batch["prompt_ids"], batch["prompt_mask"], greedy, eos_id=eos, pad_id=pad)
    mask = rl.completion_mask(completion, eos)
    n = completion.size(1)
    logps, _ = rl.token_logps(model, torch.cat([batch["prompt_ids"], completion], 1),
                              torch.cat([batch["prompt_mask"], mask.long()], 1), n, temperature=0.7)
    for i, item in enumerate(items):
        prompt = item["prompt_ids"][None]
        alone = generate(model, prompt, torch.ones_like(prompt), greedy, eos_id=eos, pad_id=pad)
        assert torch.equal(alone[0], completion[i, :alone.size(1)])
        own, _ = rl.token_logps(model, torch.cat([prompt, completion[i:i + 1]], 1),
                                torch.cat([torch.ones_like(prompt), mask[i:i + 1].long()], 1), n, temperature=0.7)
        kept = mask[i].bool()
        torch.testing.assert_close(own[0][kept], logps[i][kept], rtol=1e-4, atol=1e-5)
    with caplog.at_level(logging.WARNING):
        cut = PromptDataset(path, tokenizer, max_prompt_len=8)[1]["prompt_ids"]
    assert torch.equal(cut, items[1]["prompt_ids"][-8:]) and len(items[1]["prompt_ids"]) > 8
    assert f"{path}:2" in caplog.text and "cut to its last 8" in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# reward models

@pytest.fixture
def reward_model_dir(tmp_path, tokenizer):
    """A tiny random Hugging Face reward model (sequence classification, one label) with our tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=6400, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    return tmp_path / "rm"


def test_reward_model_scores_equal_its_own_forward_on_each_conversation(reward_model_dir, tokenizer):
    from transformers import AutoModelForSequenceClassification

    rm = RewardModel(reward_model_dir, batch_size=3)
    prompts = [[{"role": "user", "content": "1+1?"}], [{"role": "system", "content": "be brief"},
                                                       {"role": "user", "content": "天空是什么颜色？"}]] * 2
    replies = ["2", "蓝色，因为瑞利散射。", "two, I think, but let me write much more text here", ""]
    scores = rm.score(prompts, replies)  # padded batches of 3 and 1
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    for p, r, s in zip(prompts, replies, scores):
        text = tokenizer.apply_chat_template([*p, {"role": "assistant", "content": r}], tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]  # alone: no padding
        with torch.no_grad():
            assert abs(model(input_ids=ids).logits[0, 0].item() - s) < 1e-4
    assert len(set(round(s, 5) for s in scores)) == 4  # the reply matters
    assert rm(prompts[0], replies[0], None) == pytest.approx(scores[0], abs=1e-5)


def test_grpo_trains_on_a_reward_model_combined_with_rule_rewards(tmp_path, start, reward_model_dir):
    summary = reason.main(tiny_args(tmp_path, DEMO / "reason_prompts.jsonl", *GRPO, "--from", start, "--max_steps", 2,
                                    "--reward", "format", "--reward_model", reward_model_dir,
                                    "--reward_weights", "0.5,2", "--log_interval", 1))
    m = summary["metric_history"][0][1]
    assert m["reward"] == pytest.approx(m["reward_format"] + m["reward_model"], abs=1e-5)
    assert m["reward_model"] != 0.0
    with pytest.raises(SystemExit, match="2 weights for 1 rewards"):
        reason.main(tiny_args(tmp_path, DEMO / "reason_prompts.jsonl", *GRPO, "--from", start, "--reward", "format",
                              "--reward_weights", "1,2", "--max_steps", 1))


# ---------------------------------------------------------------------------------------------------------------------
# MoE routers keep their balance loss in the preference / RL losses

def _top1_moe():
    # top-1 with renormalised weights: each token's expert weight is 1, so only the balance loss reaches the router
    return make_model("tiny-moe", seed=1, num_experts_per_tok=1, n_shared_experts=0).train()


@pytest.mark.e2e
def test_dpo_grpo_and_ppo_losses_carry_the_moe_balance_loss_to_the_router(tmp_path, start, tokenizer):
    from dataset import DPODataset, dpo_collate

    model = _top1_moe()
    data = DPODataset(DEMO / "dpo.jsonl", tokenizer, 64)
    batch = dpo_collate([data[0], data[1]], pad_id=0)
    policy, aux = dpo_method.sequence_logps(model, batch["input_ids"], batch["labels"], with_aux=True)
    assert aux > 0
    (policy.sum() + aux).backward()
    with_aux = model.model.layers[0].mlp.gate.weight.grad.abs().sum()
    model.zero_grad()
    policy = dpo_method.sequence_logps(model, batch["input_ids"], batch["labels"])
    policy.sum().backward()
    # without it only rounding reaches the router (each token's one expert weighs w / w = 1)
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() < 1e-3 * with_aux

    # the stages themselves: one step of each; the router moves far more than in the same run with the balance
    # loss's coefficient set to 0 (where Adam only scales up rounding noise)
    from safetensors.torch import load_file

    def router_move(script, data_path, extra, coef):
        moe = tmp_path / f"moe{coef}"
        _top1_moe().save_pretrained(moe)
        config = json.loads((moe / "config.json").read_text())
        (moe / "config.json").write_text(json.dumps({**config, "router_aux_loss_coef": coef}))
        tokenizer.save_pretrained(moe)
        out = tmp_path / f"{script.__name__}{extra[0]}{coef}"
        script.main(tiny_args(out, data_path, "--from", moe, "--max_steps", 1, "--learning_rate", 1e-2,
                              "--weight_decay", 0, "--warmup_steps", 0, *extra))
        stage = "grpo" if script is reason else "ppo" if "ppo" in extra else "dpo"
        key = "model.layers.0.mlp.gate.weight"
        return (load_file(moe / "model.safetensors")[key] - load_file(out / "out" / stage / "model.safetensors")[key]
                ).abs().mean()

    for script, data_path, extra in ((dpo, DEMO / "dpo.jsonl", ("--batch_size", 2, "--max_seq_len", 64)),
                                     (reason, DEMO / "reason_prompts.jsonl", (*GRPO, "--reward", "format")),
                                     (dpo, DEMO / "reason_prompts.jsonl", ("--method", "ppo", "--batch_size", 2,
                                                                          "--max_new_tokens", 8, "--reward", "format",
                                                                          "--ppo_epochs", 1))):
        assert router_move(script, data_path, extra, 0.01) > 3 * router_move(script, data_path, extra, 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# agentic RL

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>'
ANSWER = "It is foggy in Lima today."


def _agent(tokenizer, script, tmp_path, scripted, **overrides):
    """An AgentGRPO whose policy is a ScriptedLM (the inference core runs it like a model), and one batch of 2
    prompts x 2 generations."""
    import types

    from helpers import ScriptedLM

    from dataset import PromptDataset, prompt_collate

    tools = json.dumps([{"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                                          "parameters": {"type": "object", "properties": {
                                                              "city": {"type": "string"}}}}}])
    row = {"conversations": [{"role": "system", "content": "", "tools": tools},
                             {"role": "user", "content": "How is the weather in Lima today?"}],
           "gt": ["foggy"], "tool_results": {"get_weather": scripted}}
    data = PromptDataset(write_jsonl(tmp_path / "agent.jsonl", [row, row]), tokenizer)
    batch = prompt_collate([data[0], data[1]], pad_id=tokenizer.pad_token_id)
    args = reason.build_parser().parse_args(["--method", "agent"])  # the stage's defaults, then these
    vars(args).update(num_generations=2, max_new_tokens=48, temperature=1.0, max_tool_rounds=2, max_seq_len=512,
                      num_iterations=1, call_reward=0.2, unfinished_penalty=0.5, loss_type="cispo", **overrides)
    trainer = types.SimpleNamespace(tokenizer=tokenizer, autocast=torch.autocast("cpu", enabled=False),
                                    device=torch.device("cpu"), env=types.SimpleNamespace(world_size=1),
                                    sampling_model=lambda policy: policy)
    agent = agent_method.AgentGRPO(args, trainer, ScriptedLM(tokenizer, script), None, {})
    return agent, batch


def test_agent_trajectories_train_only_what_the_assistant_wrote(tmp_path, tokenizer):
    def script(prompt):  # call the tool, then answer with its result
        return ANSWER if "<tool_response>" in prompt.rsplit("<|im_start|>user", 1)[-1] else CALL

    agent, batch = _agent(tokenizer, script, tmp_path, "foggy")
    r = agent.rollout(batch)
    assert r["n"] == 4  # right answer, a good call, finished
    torch.testing.assert_close(r["scores"], torch.tensor([[1.0, 0.2, 0.0]] * 4))
    ids = r["input_ids"][0]
    trained = tokenizer.decode(ids[1:][r["mask"][0].bool()])
    whole = tokenizer.decode(ids[r["attention_mask"][0].bool()])
    assert "<tool_response>" in whole and "foggy\n</tool_response>" in whole  # the tool's result is in the context
    assert trained == f"{CALL}{tokenizer.eos_token}{ANSWER}{tokenizer.eos_token}"  # ... but never trained on


def test_agent_rewards_penalise_unfinished_trajectories_and_calls_the_tool_refuses(tmp_path, tokenizer):
    agent, batch = _agent(tokenizer, lambda prompt: CALL, tmp_path, "foggy")  # never stops calling
    torch.testing.assert_close(agent.rollout(batch)["scores"], torch.tensor([[0.0, 0.2, -0.5]] * 4))
    # a scripted tool that answers only the right arguments: a call for another city gets an error, no credit
    wrong = CALL.replace("Lima", "Lyon")

    def script(prompt):
        return ANSWER if "<tool_response>" in prompt.rsplit("<|im_start|>user", 1)[-1] else wrong

    agent, batch = _agent(tokenizer, script, tmp_path, {"arguments": {"city": "Lima"}, "result": "foggy"})
    r = agent.rollout(batch)
    assert r["scores"][:, 1].tolist() == [0.0] * 4  # the only call failed
    assert scripted_tool({"arguments": {"city": "Lima"}, "result": "foggy"})(city="Lima") == "foggy"
    assert scripted_tool({"arguments": {"city": "Lima"}, "result": "foggy"})(city="Lyon").startswith("error")
    assert scripted_tool("foggy")(city="anything") == "foggy"


def test_agent_stage_runs_on_agent_rl_rows(tmp_path, start):
    summary = reason.main(tiny_args(tmp_path, DEMO / "agent_rl.jsonl", "--method", "agent", "--from", start,
                                    "--max_steps", 2, "--batch_size", 2, "--num_generations", 2, "--max_new_tokens", 8,
                                    "--max_tool_rounds", 1, "--max_seq_len", 320, "--log_interval", 1))
    assert {"reward_answer", "reward_calls", "reward_unfinished"} <= set(summary["metric_history"][0][1])
    assert (tmp_path / "out" / "agent" / "model.safetensors").exists() and summary["rollout_tokens_per_s"] > 0
    with pytest.raises(SystemExit, match=r"--reward, --thinking_ratio would be ignored"):  # not dropped silently
        reason.main(tiny_args(tmp_path, DEMO / "agent_rl.jsonl", "--method", "agent", "--from", start,
                              "--reward", "format", "--thinking_ratio", "0.5", "--max_steps", 1, "--batch_size", 2,
                              "--num_generations", 2, "--max_new_tokens", 4, "--max_tool_rounds", 1))


def test_log_probs_at_temperature_1_take_the_loss_path_and_equal_the_log_softmax():
    """token_logps at temperature 1 computes logits only at reply tokens (the model's loss path); at those tokens the
    values equal log_softmax of the full logits, and positions the attention mask leaves out get 0."""
    from trainer.rl import token_logps

    model, ids = make_model("tiny"), torch.randint(3, 6400, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # a reply that ended early: padding after its eos
    mask[1, :2] = 0  # a left-padded prompt
    with torch.no_grad():
        got, _ = token_logps(model, ids, mask, 5, 1.0)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -6:-1].float()
    expected = torch.log_softmax(logits, -1).gather(2, ids[:, -5:, None]).squeeze(2) * mask[:, -5:]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got[0, -3:] == 0).all() and (got[1:] != 0).all()
