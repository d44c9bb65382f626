"""Held-out metrics for the demo curriculum (dataset/demo/): one number per stage that should visibly move.

    pretrain_perplexity  pretrain_eval.jsonl          perplexity of held-out plain text
    qa_accuracy          sft_eval.jsonl               does the reply state the reference answer?
    reply_loss           any chat eval file           loss of the reference reply (smooth where accuracy is 0)
    preference_accuracy  dpo_eval.jsonl               is the chosen reply more likely (or more rewarded under DPO)?
    domain_accuracy      lora_medical_eval.jsonl      does the reply send the patient to the right department?
    reasoning_scores     reason_eval.jsonl            <think>/<answer> format, and the right number
    tool_use_scores      tools_eval.jsonl             a valid calculator call with the right arguments, and the right
                                                      answer once the tool ran -- beside the same model without tools

Judging one generated string against its reference is done by pure functions (`contains_answer`, `department_of`,
`format_reward`, `correctness_reward`): the tests check them by hand and GRPO uses the last two as rewards.
Only the ids the tokenizer names (pad, bos, eos) are used, so any ChatML tokenizer works -- ours, or MiniMind's, in
which `<think>` may be several tokens.
"""

import json
import math
import re
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .demo_data import occurs

# first_sentence / final_number live with the rewards that use them; imported here too for the metrics' callers
from .rewards import agent_answer_correct, correctness_reward, final_number, first_sentence, is_well_formatted  # noqa


def load_jsonl(path) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------------- pure scoring

_TRAILING = " \t\n。.！!？?，,；;：:"


def normalize(text: str) -> str:
    """Lower case, runs of whitespace collapsed to one space, ends trimmed."""
    return " ".join(text.split()).lower()


def answer_key(reference: str) -> str:
    """What a reply must contain to count as correct: the whole reference answer, normalized, without its trailing
    punctuation ("法国的首都是巴黎。" -> "法国的首都是巴黎", "3 plus 5 is 8." -> "3 plus 5 is 8").

    The whole sentence, not just its entity: the demo's answers are templates, so this checks the right entity in
    the right frame ("巴黎" alone would also credit "法国的首都不是巴黎").
    """
    return normalize(reference).rstrip(_TRAILING)


def contains_answer(generated: str, reference: str) -> bool:
    """The reply's first sentence contains `answer_key(reference)`, case-insensitively, not glued to a further ASCII
    letter or digit ("1加2等于3" does not count inside "1加2等于30").

    First sentence: the answer has to come first, so a model that rambles through every fact it knows (as a base
    model does) gets no credit for the one it happens to state.
    """
    key = answer_key(reference)
    return bool(key) and occurs(key, normalize(first_sentence(generated)))


def exact_match(generated: str, reference: str) -> bool:
    return normalize(generated) == normalize(reference)


_DEPARTMENT = re.compile(r"(?:到|去|挂)([\u4e00-\u9fff]{1,5}?科)")


def department_of(text: str):
    """The first department a medical reply sends the patient to ("建议您到呼吸内科就诊" -> "呼吸内科"), or None."""
    m = _DEPARTMENT.search(text)
    return m.group(1) if m else None


# ----------------------------------------------------------------------------------------------------- model helpers

def split_item(item):
    """(prompt messages, reference reply): everything before the last assistant message, and that message."""
    messages = item["conversations"] if isinstance(item, dict) else item
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


@contextmanager
def eval_mode(*models):
    """Dropout off while measuring; each model goes back to the mode it was in."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def _device(model):
    return next(model.parameters()).device


def _batches(lengths, batch_size):
    """Indices grouped by length, so that a batch pads little; deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def generate_replies(model, tokenizer, prompts, max_new_tokens=32, batch_size=32) -> list:
    """Greedy replies to chat prompts (lists of messages): batched with left padding, each cut at its first eos and
    decoded with special tokens kept (a tokenizer may mark <think> as special)."""
    return [text for text, _ in _generate(model, tokenizer, prompts, max_new_tokens, batch_size)]


EMPTY_THINK = "<think>\n\n</think>\n\n"  # adaptive thinking's "no thinking" block: not part of the answer


def _generate(model, tokenizer, prompts, max_new_tokens, batch_size, tools=None) -> list:
    """[(reply, stopped)]: greedy, through the inference core; stopped = the model ended its reply with eos within
    max_new_tokens. tools: one tools list (or None) per prompt, rendered into its system turn."""
    from inference import Engine, Sampling

    engine = Engine(model, tokenizer)
    tools = tools or [None] * len(prompts)
    rows = [tokenizer(engine.render(p, t), add_special_tokens=False)["input_ids"] for p, t in zip(prompts, tools)]
    with eval_mode(model):
        out = engine.generate(rows, Sampling(max_new_tokens=max_new_tokens), batch_size)
    return [(tokenizer.decode(ids, skip_special_tokens=False).removeprefix(EMPTY_THINK).strip(), stopped)
            for ids, stopped in out]


def _mean(flags):
    return sum(flags) / len(flags) if flags else 0.0


def _judge(model, tokenizer, items, judge, max_new_tokens, batch_size, return_generations):
    prompts, references = zip(*(split_item(x) for x in items))
    generated = _generate(model, tokenizer, list(prompts), max_new_tokens, batch_size)
    replies = [text for text, _ in generated]
    result = {"accuracy": _mean([judge(g, r) for g, r in zip(replies, references)]),
              "exact_match": _mean([exact_match(g, r) for g, r in zip(replies, references)]),
              "stop_rate": _mean([stopped for _, stopped in generated]), "n": len(items)}
    if return_generations:
        result["generations"] = replies
    return result


# ----------------------------------------------------------------------------------------------------- metrics

def qa_accuracy(model, tokenizer, eval_items, max_new_tokens=32, batch_size=32, return_generations=False) -> dict:
    """{"accuracy": share of replies that `contains_answer` the reference, "exact_match": share equal to it
    (normalized), "stop_rate": share that ended with eos (a chat model answers and stops, a base model rambles on),
    "n"}. Prompt: every message before the item's last assistant message."""
    return _judge(model, tokenizer, eval_items, contains_answer, max_new_tokens, batch_size, return_generations)


def domain_accuracy(model, tokenizer, eval_items, max_new_tokens=64, batch_size=32, return_generations=False) -> dict:
    """Medical set: "accuracy" = share of replies whose first department (`department_of`) is the reference's."""
    def judge(generated, reference):
        return department_of(generated) is not None and department_of(generated) == department_of(reference)
    return _judge(model, tokenizer, eval_items, judge, max_new_tokens, batch_size, return_generations)


def reasoning_scores(model, tokenizer, items, max_new_tokens=160, batch_size=32, return_generations=False) -> dict:
    """{"format_rate": share of replies that are `is_well_formatted`, "answer_accuracy": share with
    `correctness_reward` 1 against the reference's <answer> number, "stop_rate", "n"}. A reply cut off by
    max_new_tokens has no </answer>, so give room for the whole <think> part."""
    prompts, references = zip(*(split_item(x) for x in items))
    generated = _generate(model, tokenizer, list(prompts), max_new_tokens, batch_size)
    replies = [text for text, _ in generated]
    result = {"format_rate": _mean([is_well_formatted(g) for g in replies]),
              "answer_accuracy": _mean([correctness_reward(g, r) == 1.0 for g, r in zip(replies, references)]),
              "stop_rate": _mean([stopped for _, stopped in generated]), "n": len(items)}
    if return_generations:
        result["generations"] = replies
    return result


def tool_use_scores(model, tokenizer, items, max_new_tokens=64, batch_size=16, max_rounds=2, functions=None,
                    return_generations=False) -> dict:
    """agent_rl-format items (conversations with tools, "gt", optionally "expected_call" and "tool_results") through
    the inference core's tool loop (Engine.run_tools_batch, greedy): the model's calls run and their results go back
    as tool messages for up to `max_rounds` rounds; the last reply must state the answer (a number: the last one of
    its first sentence; text: contained in its first sentence). Calls run in `functions` (default: the built-in
    tools), or, for an item with "tool_results" ({name: result}), in that scripted environment: a tool whose answer
    changes from chat to chat.
    {"valid_call": share whose first reply holds a parsable call and nothing malformed, "right_tool",
    "right_arguments" (the expected call exactly, spaces aside), "answer_accuracy" (tools executed),
    "answer_accuracy_without_tools" (the same questions with no tools in the prompt), "n"}."""
    from inference import BUILTIN_TOOLS, Engine, Sampling
    from inference.tools import scripted_tool

    from .chat import normalize_chat

    chats = [normalize_chat(x["conversations"], complete=False) for x in items]
    envs = []
    for x in items:
        scripted = x.get("tool_results")
        envs.append(functions or BUILTIN_TOOLS if scripted is None else
                    {name: scripted_tool(r) for name, r in scripted.items()})
    engine = Engine(model, tokenizer)
    with eval_mode(model):
        runs = engine.run_tools_batch([m for m, _ in chats], envs, tools=[t for _, t in chats],
                                      max_rounds=max_rounds, sampling=Sampling(max_new_tokens=max_new_tokens),
                                      batch_size=batch_size)
    finals = [last.content for _, _, last in runs]


    def same_call(call, expected):
        squash = lambda v: json.dumps(v, sort_keys=True).replace(" ", "")  # noqa: E731
        return call["function"]["name"] == expected["name"] and \
            squash(json.loads(call["function"]["arguments"])) == squash(expected["arguments"])

    plain = [[m for m in msgs if m["role"] != "system" or m["content"].strip()] for msgs, _ in chats]
    without = [text for text, _ in _generate(model, tokenizer, plain, max_new_tokens, batch_size)]
    valid = [bool(first.tool_calls) and not first.errors for _, first, _ in runs]
    expected = [x.get("expected_call") for x in items]
    calls = [first.tool_calls for _, first, _ in runs]
    result = {"valid_call": _mean(valid),
              "right_tool": _mean([v and e is not None and calls[i][0]["function"]["name"] == e["name"]
                                   for i, (v, e) in enumerate(zip(valid, expected))]),
              "right_arguments": _mean([v and e is not None and same_call(calls[i][0], e)
                                        for i, (v, e) in enumerate(zip(valid, expected))]),
              "answer_accuracy": _mean([agent_answer_correct(finals[i], items[i]["gt"]) for i in range(len(items))]),
              "answer_accuracy_without_tools": _mean([agent_answer_correct(without[i], items[i]["gt"]) for i in range(len(items))]),
              "n": len(items)}
    if return_generations:
        result["generations"] = [new for new, _, _ in runs]
        result["generations_without_tools"] = without
    return result


def reply_ids(tokenizer, messages):
    """(prompt ids, reply ids) of a chat whose last message is the reply: the prompt is the chat template of the
    earlier messages with the generation prompt; the reply is the last message's content plus the eos that closes
    it -- the tokens SFT and DPO train on."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    content = messages[-1]["content"]
    if not tokenizer.apply_chat_template(messages, tokenize=False).startswith(prompt + content):
        raise ValueError("the chat template does not render the last message right after the generation prompt")
    reply = content + tokenizer.eos_token
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(prompt + reply, add_special_tokens=False)["input_ids"]
    if full_ids[:len(prompt_ids)] == prompt_ids:
        return prompt_ids, full_ids[len(prompt_ids):]
    return prompt_ids, tokenizer(reply, add_special_tokens=False)["input_ids"]  # a merge across the boundary


def reply_logps(model, tokenizer, conversations, batch_size=16) -> torch.Tensor:
    """Summed log-probability of each conversation's last message (content + eos) given the messages before it."""
    return _reply_logps(model, tokenizer, conversations, batch_size)[0]


def reply_loss(model, tokenizer, items, batch_size=16) -> dict:
    """{"loss": mean next-token loss over the reference replies (content + eos, teacher-forced), "tokens"}.

    Moves smoothly where accuracy is still 0 -- a tiny model assigns the right answer more probability long before
    greedy decoding produces it.
    """
    logps, counts = _reply_logps(model, tokenizer, [x["conversations"] if isinstance(x, dict) else x for x in items],
                                 batch_size)
    return {"loss": -logps.sum().item() / max(int(counts.sum()), 1), "tokens": int(counts.sum())}


@torch.no_grad()
def _reply_logps(model, tokenizer, conversations, batch_size):
    """(summed log-probability of each last message, its token count)."""
    pairs = [reply_ids(tokenizer, msgs) for msgs in conversations]
    seqs = [p + r for p, r in pairs]
    out = torch.zeros(len(seqs), dtype=torch.float64)
    with eval_mode(model):
        for batch in _batches([len(s) for s in seqs], batch_size):
            width = max(len(seqs[i]) for i in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            reply_mask = torch.zeros_like(input_ids, dtype=torch.bool)
            for row, i in enumerate(batch):  # right padding
                n_prompt, n = len(pairs[i][0]), len(seqs[i])
                input_ids[row, :n] = torch.tensor(seqs[i])
                attention_mask[row, :n] = 1
                reply_mask[row, n_prompt:n] = True
            device = _device(model)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            token_logp = logp.gather(-1, input_ids[:, 1:, None].to(device)).squeeze(-1)
            out[batch] = (token_logp * reply_mask[:, 1:].to(device)).sum(-1).double().cpu()
    return out, torch.tensor([len(r) for _, r in pairs])


def preference_accuracy(model, tokenizer, pairs, ref_model=None, batch_size=16) -> dict:
    """{"accuracy": share of pairs whose margin is > 0 (ties count as wrong), "margin": mean margin, "n"}.

    Margin: log p(chosen reply) - log p(rejected reply) under the model, replies summed over content + eos; with
    `ref_model`, the DPO implicit reward margin instead: the same difference minus the reference model's.
    """
    chosen = reply_logps(model, tokenizer, [p["chosen"] for p in pairs], batch_size)
    rejected = reply_logps(model, tokenizer, [p["rejected"] for p in pairs], batch_size)
    margin = chosen - rejected
    if ref_model is not None:
        margin = margin - (reply_logps(ref_model, tokenizer, [p["chosen"] for p in pairs], batch_size)
                           - reply_logps(ref_model, tokenizer, [p["rejected"] for p in pairs], batch_size))
    return {"accuracy": (margin > 0).double().mean().item(), "margin": margin.mean().item(), "n": len(pairs)}


@torch.no_grad()
def pretrain_perplexity(model, tokenizer, texts, max_seq_len=256, batch_size=16) -> dict:
    """{"perplexity": exp(loss), "loss": mean next-token loss over all scored tokens, "tokens": their count}.

    Each text (a string or a {"text": ...} row) is laid out as in pretraining -- bos + text + eos -- cut to
    `max_seq_len` tokens, and scored alone; every token after the first is predicted.
    """
    texts = [t["text"] if isinstance(t, dict) else t for t in texts]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    seqs = [(bos + ids + [tokenizer.eos_token_id])[:max_seq_len]
            for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    total, count = 0.0, 0
    with eval_mode(model):
        for batch in _batches([len(s) for s in seqs], batch_size):
            width = max(len(seqs[i]) for i in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            labels = torch.full_like(input_ids, -100)
            attention_mask = torch.zeros_like(input_ids)
            for row, i in enumerate(batch):
                input_ids[row, :len(seqs[i])] = torch.tensor(seqs[i])
                labels[row, :len(seqs[i])] = torch.tensor(seqs[i])
                attention_mask[row, :len(seqs[i])] = 1
            device = _device(model)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits.float()
            targets = labels[:, 1:].to(device)
            total += F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100,
                                     reduction="sum").item()
            count += int((targets != -100).sum())
    loss = total / max(count, 1)
    return {"perplexity": math.exp(loss), "loss": loss, "tokens": count}
