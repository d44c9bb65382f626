"""Held-out metrics for the demo curriculum (demo/data/): one number per stage that should visibly move.

    pretrain_perplexity  pretrain_eval.jsonl          perplexity of held-out plain text
    qa_accuracy          sft_eval.jsonl               does the reply state the reference answer?
    reply_loss           any chat eval file           loss of the reference reply (smooth where accuracy is 0)
    preference_accuracy  dpo_eval.jsonl               is the chosen reply more likely (or more rewarded under DPO)?
    domain_accuracy      lora_medical_eval.jsonl      does the reply send the patient to the right department?
    reasoning_scores     reason_eval.jsonl            <think>/<answer> format, and the right number
    tool_use_scores      tools_eval.jsonl             a valid weather call with the right arguments, and the right
                                                      answer once the tool ran -- beside the same model without tools
                                                      (trainer/tool_eval.py: scripts/eval_tools.py scores with it too)

Judging one generated string against its reference is done by pure functions (`contains_answer`, `department_of`,
`format_reward`, `correctness_reward`): the tests check them by hand and GRPO uses the last two as rewards.
Only the ids the tokenizer names (pad, bos, eos) are used, so any ChatML tokenizer works -- ours, or MiniMind's, in
which `<think>` may be several tokens.
"""

import math
import re

import torch
import torch.nn.functional as F

# first_sentence / final_number live with the rewards that use them, tool_use_scores with the other scoring of
# generations; imported here too for the metrics' callers
from trainer.rewards import correctness_reward, final_number, first_sentence, is_well_formatted  # noqa: F401
from trainer.tool_eval import eval_mode, greedy_replies, mean, tool_use_scores  # noqa: F401

from .curriculum import occurs


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


def _device(model):
    return next(model.parameters()).device


def _batches(lengths, batch_size):
    """Indices grouped by length, so that a batch pads little; deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def generate_replies(model, tokenizer, prompts, max_new_tokens=32, batch_size=32) -> list:
    """Greedy replies to chat prompts (lists of messages): batched with left padding, each cut at its first eos and
    decoded with special tokens kept (a tokenizer may mark <think> as special)."""
    return [text for text, _ in greedy_replies(model, tokenizer, prompts, max_new_tokens, batch_size)]


def _judge(model, tokenizer, items, judge, max_new_tokens, batch_size, return_generations):
    prompts, references = zip(*(split_item(x) for x in items))
    generated = greedy_replies(model, tokenizer, list(prompts), max_new_tokens, batch_size)
    replies = [text for text, _ in generated]
    result = {"accuracy": mean([judge(g, r) for g, r in zip(replies, references)]),
              "exact_match": mean([exact_match(g, r) for g, r in zip(replies, references)]),
              "stop_rate": mean([stopped for _, stopped in generated]), "n": len(items)}
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
    generated = greedy_replies(model, tokenizer, list(prompts), max_new_tokens, batch_size)
    replies = [text for text, _ in generated]
    result = {"format_rate": mean([is_well_formatted(g) for g in replies]),
              "answer_accuracy": mean([correctness_reward(g, r) == 1.0 for g, r in zip(replies, references)]),
              "stop_rate": mean([stopped for _, stopped in generated]), "n": len(items)}
    if return_generations:
        result["generations"] = replies
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
