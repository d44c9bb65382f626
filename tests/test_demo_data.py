"""The demo curriculum (demo/data/): generator determinism, exact schemas, no held-out leaks, and the metrics."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, ScriptedLM, last_turn, make_model
from transformers import AutoTokenizer

from dataset.chat import check_conversations
from dataset import read_jsonl
from demo import curriculum
from demo.curriculum import occurs
from demo.metrics import (answer_key, contains_answer, department_of, exact_match, first_sentence, normalize,
                          preference_accuracy, pretrain_perplexity, qa_accuracy, reasoning_scores, reply_ids,
                          reply_logps, reply_loss, split_item)
from trainer.rewards import correctness_reward, format_reward, is_well_formatted
from model import TOKENIZER_DIR

DEMO = ROOT / "demo" / "data"
CHAT_FILES = ["sft.jsonl", "sft_eval.jsonl", "kd.jsonl", "kd_eval.jsonl", "lora_medical.jsonl", "lora_medical_eval.jsonl",
              "reason.jsonl", "reason_eval.jsonl", "reason_prompts.jsonl"]
DPO_FILES = ["dpo.jsonl", "dpo_eval.jsonl"]
TEXT_FILES = ["pretrain.jsonl", "pretrain_eval.jsonl"]
TRAIN_CHAT_FILES = ["sft.jsonl", "kd.jsonl", "dpo.jsonl", "lora_medical.jsonl", "reason.jsonl",
                    "reason_prompts.jsonl"]
REASONING = re.compile(r"<think>\n(.+)\n</think>\n<answer>\n(\d+)\n</answer>", re.S)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def demo():
    return {name: read_jsonl(DEMO / name) for name in CHAT_FILES + DPO_FILES + TEXT_FILES + ["tools_eval.jsonl", "sft_tools.jsonl"]}


def texts_of(rows):
    """Every string a training file shows the model: texts, and all message contents (both sides of DPO pairs)."""
    return "\n".join(r["text"] if "text" in r else "\n".join(m["content"] for m in curriculum.messages_of(r))
                     for r in rows)


# ---------------------------------------------------------------------------------------------------- generator

def test_generator_is_deterministic_and_the_seed_matters(tmp_path):
    def run(out, *args, hash_seed="0"):  # different string hashing per run: iterating a set would show
        subprocess.run([sys.executable, "-m", "demo.curriculum", "--out_dir", str(out), *args],
                       check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": hash_seed})
        return {p.name: p.read_bytes() for p in sorted(out.iterdir())}

    first, again = run(tmp_path / "a"), run(tmp_path / "b", "--seed", "0", hash_seed="1")
    other = run(tmp_path / "c", "--seed", "1")
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first if name.endswith(".jsonl"))


def test_shipped_files_equal_the_generator_output():
    rendered = curriculum.render(curriculum.DEFAULT_SEED)
    stale = [p.name for p in DEMO.iterdir() if p.suffix in (".jsonl", ".md") and p.name not in rendered]
    assert not stale  # (token caches that the datasets write beside the data are not ours to judge)
    for name, data in rendered.items():
        assert (DEMO / name).read_bytes() == data, f"{name} was edited by hand; rerun python -m demo.curriculum"


def test_sizes_and_row_counts():
    counts = {name: sum(1 for _ in open(DEMO / name, encoding="utf-8")) for name in CHAT_FILES + DPO_FILES}
    assert counts["sft.jsonl"] == 3000 and counts["kd.jsonl"] == 500 and counts["dpo.jsonl"] == 1500
    assert counts["lora_medical.jsonl"] == 1000 and counts["reason.jsonl"] == 1500
    assert 80 <= min(counts[n] for n in ["sft_eval.jsonl", "kd_eval.jsonl", "dpo_eval.jsonl",
                                         "lora_medical_eval.jsonl", "reason_eval.jsonl"])
    assert 1_000_000 <= (DEMO / "pretrain.jsonl").stat().st_size <= 2_000_000
    assert sum(p.stat().st_size for p in DEMO.iterdir() if p.suffix in (".jsonl", ".md")) < 5 * 1024 * 1024


# ---------------------------------------------------------------------------------------------------- schemas

def assert_chat(messages):
    assert isinstance(messages, list) and messages
    for m in messages:
        assert set(m) == {"role", "content"} and isinstance(m["content"], str) and m["content"].strip(), m
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    assert body and body == ["user", "assistant"] * (len(body) // 2), roles


@pytest.mark.parametrize("name", TEXT_FILES + CHAT_FILES + DPO_FILES)
def test_every_line_follows_its_schema(name):
    lines = (DEMO / name).read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""  # one object per line, newline-terminated
    for line in lines[:-1]:
        row = json.loads(line)
        assert line == json.dumps(row, ensure_ascii=False)  # readable UTF-8, one object per line
        if name in TEXT_FILES:
            assert set(row) == {"text"} and isinstance(row["text"], str) and row["text"].strip()
        elif name in CHAT_FILES:
            assert set(row) == {"conversations"}
            if "tools" in row["conversations"][0]:  # tool chats: checked by the datasets' own schema
                check_conversations(row)
            else:
                assert_chat(row["conversations"])
        else:
            assert set(row) == {"chosen", "rejected"}
            assert_chat(row["chosen"])
            assert_chat(row["rejected"])


@pytest.mark.parametrize("name", ["reason.jsonl", "reason_eval.jsonl", "reason_prompts.jsonl"])
def test_reasoning_replies_think_then_answer_a_number_that_the_steps_reach(demo, name):
    for row in demo[name]:
        reply = row["conversations"][-1]["content"]
        m = REASONING.fullmatch(reply)
        assert m, reply
        steps = re.findall(r"(\d+)(?:加| plus )(\d+)(?:等于| is )(\d+)|(\d+)(?:减| minus )(\d+)(?:等于| is )(\d+)",
                           m.group(1))
        assert len(steps) in ((1, 2, 3) if name == "reason.jsonl" else (2, 3))  # SFT: some traces skip one event
        last = [int(x) for x in steps[-1] if x][-1]
        assert last == int(m.group(2))
        assert format_reward(reply) == 1.0 and correctness_reward(reply, m.group(2)) == 1.0


def story_events(question: str) -> int:
    """The events of a word problem: its sentences between the starting count and the question."""
    return question.count("。") - 1 if "。" in question else question.count(".") - 1


def traced_steps(reply: str) -> int:
    return len(re.findall(r"(?:加|减| plus | minus )\d+(?:等于| is )", reply))


def test_reasoning_sft_traces_skip_the_last_event_at_the_careless_share_and_eval_traces_never(demo):
    """The imperfect teacher: a share of the SFT traces stop one event early (so their answer is wrong for the
    story), which gives the reason model two habits for GRPO to choose between; the held-out and GRPO prompt files
    keep every event, since the metric and the reward check against their answers."""
    for name in ("reason_eval.jsonl", "reason_prompts.jsonl"):
        assert all(traced_steps(r["conversations"][1]["content"]) == story_events(r["conversations"][0]["content"])
                   for r in demo[name]), name
    gaps = [story_events(r["conversations"][0]["content"]) - traced_steps(r["conversations"][1]["content"])
            for r in demo["reason.jsonl"]]
    assert set(gaps) == {0, 1}
    assert abs(sum(gaps) / len(gaps) - curriculum.CARELESS_SHARE) < 0.05


def test_tool_chats_call_the_weather_tool_and_answer_with_its_result(demo):
    capitals = {name for c in curriculum.COUNTRIES for name in (c[2], c[3])}
    words = {w for pair in curriculum.WEATHER for w in pair}
    calls, seen = 0, set()
    for chat in (r["conversations"] for r in demo["sft_tools.jsonl"]):
        assert json.loads(chat[0]["tools"]) == [curriculum.WEATHER_SCHEMA]
        for i, m in enumerate(chat):
            if m.get("tool_calls"):
                (call,) = json.loads(m["tool_calls"])
                city, result = call["arguments"]["city"], chat[i + 1]["content"]
                assert call["name"] == "get_weather" and city in capitals and city in chat[i - 1]["content"]
                assert chat[i + 1]["role"] == "tool" and result in words
                assert city in chat[i + 2]["content"] and result in chat[i + 2]["content"]
                seen.add((city, result))
                calls += 1
    assert 500 <= calls < len(demo["sft_tools.jsonl"])  # and some questions are answered without a call
    assert len({r for _, r in seen}) == len(words)  # every weather in both languages: it is not the city's
    assert len({c for c, _ in seen}) == len(capitals)
    assert all(len({r for c2, r in seen if c2 == c}) >= 3 for c in capitals)  # a city's weather varies by chat
    for item in demo["tools_eval.jsonl"]:
        city = item["expected_call"]["arguments"]["city"]
        assert city in item["conversations"][-1]["content"] and item["tool_results"] == {"get_weather": item["gt"][0]}


def test_every_stated_sum_is_true(demo):
    """Sums in the pretraining text, the chats and the chosen DPO replies are right (only rejected ones lie)."""
    text = texts_of(demo["pretrain.jsonl"] + demo["sft.jsonl"] + demo["kd.jsonl"] + demo["reason.jsonl"])
    text += "\n".join(m["content"] for r in demo["dpo.jsonl"] for m in r["chosen"])
    sums = re.findall(r"(?<!\d)(\d+)(加|减| plus | minus )(\d+)(?:等于| is )(\d+)(?!\d)", text)
    assert len(sums) > 10_000
    for a, op, b, c in sums:
        assert int(c) == (int(a) + int(b) if op in ("加", " plus ") else int(a) - int(b)), (a, op, b, c)


def test_dpo_pairs_share_the_prompt_and_differ_in_the_last_reply(demo):
    longer_chosen = longer_rejected = 0
    for row in demo["dpo.jsonl"] + demo["dpo_eval.jsonl"]:
        chosen, rejected = row["chosen"], row["rejected"]
        assert chosen[:-1] == rejected[:-1] and chosen[-1]["role"] == rejected[-1]["role"] == "assistant"
        assert chosen[-1]["content"] != rejected[-1]["content"]
        longer_chosen += len(chosen[-1]["content"]) > len(rejected[-1]["content"])
        longer_rejected += len(chosen[-1]["content"]) < len(rejected[-1]["content"])
    assert longer_chosen > 100 and longer_rejected > 100  # length alone does not give the answer away


def test_kd_has_long_multi_turn_rows(demo, tokenizer):
    lengths = [len(tokenizer(tokenizer.apply_chat_template(r["conversations"], tokenize=False),
                             add_special_tokens=False)["input_ids"]) for r in demo["kd.jsonl"]]
    assert 25 <= sum(n > 300 for n in lengths) < len(lengths) // 2
    assert all(sum(m["role"] == "assistant" for m in r["conversations"]) >= 2 for r in demo["kd.jsonl"])


# ---------------------------------------------------------------------------------------------------- held out

def test_held_out_answers_occur_only_in_pretraining_text(demo):
    """What sft_eval / kd_eval / dpo_eval ask is stated in pretrain.jsonl and in no training chat -- judged by the same rule
    as the metric (`contains_answer`), so a model can only answer from what pretraining stored."""
    pretrain = normalize(texts_of(demo["pretrain.jsonl"]))
    training = {name: normalize(texts_of(demo[name])) for name in TRAIN_CHAT_FILES}
    keys = {answer_key(split_item(r)[1]) for r in demo["sft_eval.jsonl"]}
    keys |= {answer_key(r["chosen"][-1]["content"]) for r in demo["dpo_eval.jsonl"]}
    keys |= {answer_key(first_sentence(split_item(r)[1])) for r in demo["kd_eval.jsonl"]}  # rich answers lead with it
    assert len(keys) >= 50
    for key in sorted(keys):
        assert occurs(key, pretrain), f"{key!r} is asked in an eval file but never stated in pretraining"
        for name, text in training.items():
            assert not occurs(key, text), f"held-out {key!r} leaked into {name}"


@pytest.mark.parametrize("train,held", [("pretrain.jsonl", "pretrain_eval.jsonl"), ("sft.jsonl", "sft_eval.jsonl"),
                                        ("kd.jsonl", "kd_eval.jsonl"), ("dpo.jsonl", "dpo_eval.jsonl"),
                                        ("lora_medical.jsonl", "lora_medical_eval.jsonl"),
                                        ("reason.jsonl", "reason_eval.jsonl"),
                                        ("reason_prompts.jsonl", "reason_eval.jsonl")])
def test_eval_prompts_never_occur_in_training(demo, train, held):
    def prompt(row):
        return row["text"] if "text" in row else json.dumps(split_item(row.get("conversations") or row["chosen"])[0],
                                                            ensure_ascii=False)
    seen = {prompt(r) for r in demo[train]}
    assert not [prompt(r) for r in demo[held] if prompt(r) in seen]


def test_medical_eval_departments_are_checkable_and_taught(demo):
    taught = {department_of(split_item(r)[1]) for r in demo["lora_medical.jsonl"]}
    assert None not in taught and len(taught) == 10
    for row in demo["lora_medical_eval.jsonl"]:
        assert department_of(split_item(row)[1]) in taught


# ---------------------------------------------------------------------------------------------------- pure scoring

def test_contains_answer_needs_the_whole_answer_first_and_unglued():
    assert answer_key("法国的首都是巴黎。") == "法国的首都是巴黎"
    assert answer_key(" The capital of France is Paris. ") == "the capital of france is paris"
    assert contains_answer("法国的首都是巴黎。巴黎很美。", "法国的首都是巴黎。")
    assert contains_answer("the capital of  France is Paris", "The capital of France is Paris.")
    assert contains_answer("The capital of India is New Delhi. It is big.", "The capital of India is New Delhi.")
    assert not contains_answer("巴黎很美。法国的首都是巴黎。", "法国的首都是巴黎。")  # not the first sentence
    assert not contains_answer("Hi\nThe capital of France is Paris.", "The capital of France is Paris.")
    assert not contains_answer("法国的首都是柏林。", "法国的首都是巴黎。")
    assert not contains_answer("巴黎", "法国的首都是巴黎。")
    assert contains_answer("好的，1加2等于3。", "1加2等于3。")
    assert not contains_answer("1加2等于30。", "1加2等于3。")
    assert not contains_answer("11 plus 2 is 3.", "1 plus 2 is 3.")
    assert exact_match(" 3 plus 5 is 8. ", "3 plus 5 is 8.") and not exact_match("3 plus 5 is 8", "3 plus 5 is 8.")


def test_department_of_reads_the_first_department():
    assert department_of("根据您的描述，建议您到心血管内科就诊。注意休息。") == "心血管内科"
    assert department_of("建议去眼科，不行再到皮肤科。") == "眼科"
    assert department_of("多喝水，注意休息。") is None


@pytest.mark.parametrize("text,reward", [
    ("<think>\n3加5等于8。\n</think>\n<answer>\n8\n</answer>", 1.0),
    ("  <think>x</think><answer>8</answer>\n", 1.0),
    ("<think>\n\n</think>\n<answer>\n8\n</answer>", 0.4),          # empty reasoning
    ("<think>x</think><answer>8</answer> and more", 0.4),          # text after the answer
    ("<answer>8</answer><think>x</think>", 0.4),                   # wrong order
    ("<think>x</think><answer>8</answer><answer>8</answer>", 0.2),  # answer tag twice
    ("<think>x</think>8", 0.2),
    ("8", 0.0),
])
def test_format_reward(text, reward):
    assert format_reward(text) == pytest.approx(reward)
    assert is_well_formatted(text) == (reward == 1.0)


@pytest.mark.parametrize("text,reward", [
    ("<think>x</think>\n<answer>\n8\n</answer>", 1.0),
    ("<answer>小明现在有8个苹果</answer>", 1.0),
    ("<think>x</think><answer>7</answer>", 0.0),
    ("<think>x</think><answer>18</answer>", 0.0),
    ("<think>x</think><answer>7 or 8</answer>", 0.0),
    ("<think>x</think><answer>8</answer><answer>8</answer>", 0.0),
    ("<think>the answer is 8</think>", 0.0),
    ("<think>x</think>8.0", 1.0),  # a plain reply (no answer tags) is judged on its text after the think block
    ("8", 1.0),
    ("<answer>8", 0.0),  # answer tags, but not one pair
])
def test_correctness_reward(text, reward):
    assert correctness_reward(text, "8") == reward
    assert correctness_reward(text, 8) == reward
    assert correctness_reward(text, "<think>\n5加3等于8。\n</think>\n<answer>\n8\n</answer>") == reward


# ---------------------------------------------------------------------------------------------------- metrics

def ScriptedModel(tokenizer, script):
    """A causal LM that answers each prompt's last user message from `script` (see conftest.ScriptedLM)."""
    return ScriptedLM(tokenizer, lambda prompt: script[last_turn(prompt)])


def test_qa_accuracy_scores_generations_against_references(demo, tokenizer):
    items = demo["sft_eval.jsonl"][:10]
    script = {}
    for i, item in enumerate(items):
        prompt, reference = split_item(item)
        script[prompt[-1]["content"]] = (reference if i < 4 else                   # exact
                                         "好的，" + reference + "还有别的吗？" if i < 7 else  # contains
                                         "我不知道。")                             # wrong
    model = ScriptedModel(tokenizer, script).train()
    result = qa_accuracy(model, tokenizer, items, max_new_tokens=40, batch_size=3, return_generations=True)
    assert result["accuracy"] == pytest.approx(0.7) and result["exact_match"] == pytest.approx(0.4)
    assert result["stop_rate"] == 1.0
    assert result["n"] == 10 and result["generations"][0] == split_item(items[0])[1]
    assert model.training  # the mode the model came in with
    for item in items:  # the prompt is the chat template of every message before the reference reply
        prompt = next(p for p in model.prompts if split_item(item)[0][-1]["content"] in p)
        assert prompt == tokenizer.apply_chat_template(split_item(item)[0], add_generation_prompt=True,
                                                       tokenize=False)


def test_reasoning_scores_count_format_and_answer_separately(demo, tokenizer):
    items = demo["reason_eval.jsonl"][:4]
    replies = [split_item(items[0])[1],                                            # right
               split_item(items[1])[1].replace("<answer>\n", "<answer>\n1"),        # well formed, wrong number
               "<answer>\n" + str(int(REASONING.fullmatch(split_item(items[2])[1]).group(2))) + "\n</answer>",
               "不知道"]
    script = {split_item(it)[0][-1]["content"]: r for it, r in zip(items, replies)}
    result = reasoning_scores(ScriptedModel(tokenizer, script), tokenizer, items, max_new_tokens=200)
    assert result == {"format_rate": 0.5, "answer_accuracy": 0.5, "stop_rate": 1.0, "n": 4}


def test_reply_logps_score_the_reply_and_its_eos_only(tokenizer):
    model = make_model("tiny")
    short = [{"role": "user", "content": "3加5等于几？"}, {"role": "assistant", "content": "3加5等于8。"}]
    long = [{"role": "system", "content": "你是一个乐于助人的助手。"}] + short[:1] + \
        [{"role": "assistant", "content": "我不知道，你最好自己再查一查，这个问题有点难。"}]
    prompt, reply = reply_ids(tokenizer, short)
    assert reply[-1] == tokenizer.eos_token_id and tokenizer.decode(reply[:-1]) == "3加5等于8。"
    ids = torch.tensor([prompt + reply])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    expected = logp[len(prompt) - 1:].sum().item()
    alone = reply_logps(model, tokenizer, [short])[0].item()
    batched = reply_logps(model, tokenizer, [long, short], batch_size=2)[1].item()  # right-padded next to a longer row
    assert alone == pytest.approx(expected, abs=1e-4) and batched == pytest.approx(expected, abs=1e-4)
    loss = reply_loss(model, tokenizer, [{"conversations": short}])
    assert loss["tokens"] == len(reply) and loss["loss"] == pytest.approx(-expected / len(reply), abs=1e-5)


def test_preference_accuracy_is_a_fraction_that_swapping_complements(demo, tokenizer):
    model, ref = make_model("tiny", seed=0), make_model("tiny", seed=1)
    pairs = demo["dpo_eval.jsonl"][:16]
    swapped = [{"chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]
    for reference in (None, ref):
        a = preference_accuracy(model, tokenizer, pairs, ref_model=reference, batch_size=5)
        b = preference_accuracy(model, tokenizer, swapped, ref_model=reference, batch_size=5)
        assert 0.0 <= a["accuracy"] <= 1.0 and a["n"] == 16
        assert a["accuracy"] + b["accuracy"] == pytest.approx(1.0)
        assert a["margin"] == pytest.approx(-b["margin"])
    # against itself as the reference every implicit reward is 0: a tie, and ties are not wins
    same = preference_accuracy(model, tokenizer, pairs, ref_model=model)
    assert same["accuracy"] == 0.0 and same["margin"] == 0.0


def test_pretrain_perplexity_is_the_token_weighted_model_loss(tokenizer):
    model = make_model("tiny")
    texts = ["法国的首都是巴黎。小明住在上海。", "3 plus 5 is 8. A dog says woof."]
    losses, counts = [], []
    for text in texts:
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"],
                             tokenizer.eos_token_id]])
        with torch.no_grad():
            losses.append(model(ids, labels=ids).loss.item())
        counts.append(ids.shape[1] - 1)
    result = pretrain_perplexity(model, tokenizer, [{"text": texts[0]}, texts[1]], batch_size=2)
    expected = sum(l * n for l, n in zip(losses, counts)) / sum(counts)
    assert result["tokens"] == sum(counts)
    assert result["loss"] == pytest.approx(expected, abs=1e-4)
    assert result["perplexity"] == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-4)
    assert pretrain_perplexity(model, tokenizer, texts[:1], max_seq_len=5)["tokens"] == 4
