"""Scoring a model's tool use: held-out tool tasks through the inference core's tool loop (`tool_use_scores`, used by
scripts/eval_tools.py and the demo), plus the greedy decoding every held-out generation metric shares.

It lives in trainer/, beside the rewards, because an answer counts by `agent_answer_correct` -- the very rule agentic
RL rewards -- so the score a run reports and the reward it trained on cannot disagree.
"""

import json
from contextlib import contextmanager

from dataset.chat import normalize_chat
from inference import BUILTIN_TOOLS, Engine, Sampling
from inference.tools import scripted_tool

from .rewards import agent_answer_correct

EMPTY_THINK = "<think>\n\n</think>\n\n"  # adaptive thinking's "no thinking" block: not part of the answer


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


def greedy_replies(model, tokenizer, prompts, max_new_tokens, batch_size, tools=None) -> list:
    """[(reply, stopped)]: greedy, through the inference core; stopped = the model ended its reply with eos within
    max_new_tokens. tools: one tools list (or None) per prompt, rendered into its system turn."""
    engine = Engine(model, tokenizer)
    tools = tools or [None] * len(prompts)
    rows = [tokenizer(engine.render(p, t), add_special_tokens=False)["input_ids"] for p, t in zip(prompts, tools)]
    with eval_mode(model):
        out = engine.generate(rows, Sampling(max_new_tokens=max_new_tokens), batch_size)
    return [(tokenizer.decode(ids, skip_special_tokens=False).removeprefix(EMPTY_THINK).strip(), stopped)
            for ids, stopped in out]


def mean(flags) -> float:
    """Share of true flags (0.0 for none)."""
    return sum(flags) / len(flags) if flags else 0.0


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
    without = [text for text, _ in greedy_replies(model, tokenizer, plain, max_new_tokens, batch_size)]
    valid = [bool(first.tool_calls) and not first.errors for _, first, _ in runs]
    expected = [x.get("expected_call") for x in items]
    calls = [first.tool_calls for _, first, _ in runs]
    result = {"valid_call": mean(valid),
              "right_tool": mean([v and e is not None and calls[i][0]["function"]["name"] == e["name"]
                                  for i, (v, e) in enumerate(zip(valid, expected))]),
              "right_arguments": mean([v and e is not None and same_call(calls[i][0], e)
                                       for i, (v, e) in enumerate(zip(valid, expected))]),
              "answer_accuracy": mean([agent_answer_correct(finals[i], items[i]["gt"]) for i in range(len(items))]),
              "answer_accuracy_without_tools": mean([agent_answer_correct(without[i], items[i]["gt"])
                                                     for i in range(len(items))]),
              "n": len(items)}
    if return_generations:
        result["generations"] = [new for new, _, _ in runs]
        result["generations_without_tools"] = without
    return result
