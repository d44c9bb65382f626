"""Conversations of both MiniMind generations: checked, normalised for the chat template, and encoded with labels on
exactly what the assistant writes.

A row's messages (MiniMind's `sft_t2t*`, `rlaif`, `agent_rl*` and the seed's files):
    system     content, optional "tools" (a JSON string or a list of OpenAI-style function schemas; "functions" too)
    user       content
    assistant  content (may be "" beside tool calls), optional "reasoning_content", optional "tool_calls" (a JSON
               string or a list; items {"name", "arguments"} or {"type": "function", "function": {...}})
    tool       content: a tool's result
Keys whose value is null are ignored (MiniMind's files carry every key on every message).

Labels: from where the template's role header ends to the turn's closing eos, for every assistant turn; so the
reasoning, the tool calls, the reply and the eos are learnt, and the system/tools text, user turns and tool results
are not. The header is what the template writes before any assistant's own text (found once per tokenizer); a
template that always writes a think block (minimind-3's) keeps that block out of the labels, ours labels it.

Fields a template cannot render (found once per template by rendering probe chats, `template_support`) are written
the way our own template writes them, inside text the template does render (`with_fallbacks`): reasoning inline as
"<think>\n…\n</think>\n\n" before the reply, tool calls as Hermes <tool_call> blocks after it, the tools list as
a system block, tool results as one user turn of <tool_response> blocks. What a template still drops (Qwen3's drops
the reasoning of turns before the last user turn) is found per row (`lost_fields`), counted and reported.
"""

import hashlib
import json
import logging
import os
from dataclasses import dataclass

import torch
from jinja2.exceptions import TemplateError

from .jsonl import BadLineError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
_SENTINELS = ("\x01", "\x02")  # two replies that differ in their first character: their common prefix is the header


# ------------------------------------------------------------------------------------------------ checking

def _json_field(value, what):
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise BadLineError(f"{what} is not valid JSON ({e})") from None
    return value


def normalize_tool_call(call, what) -> dict:
    """{"name", "arguments"} or OpenAI's {"type": "function", "function": {...}} -> OpenAI's form, arguments a dict."""
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        extra = {k: call[k] for k in ("id",) if isinstance(call.get(k), str)}
        call = call["function"]
    else:
        extra = {}
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"].strip():
        raise BadLineError(f"{what} has no function name")
    arguments = _json_field(call.get("arguments", {}), f"{what} arguments")
    if not isinstance(arguments, dict):
        raise BadLineError(f"{what} arguments are not a JSON object")
    return {**extra, "type": "function", "function": {"name": call["name"], "arguments": arguments}}


def normalize_tools(value, what) -> list:
    tools = _json_field(value, what)
    if not isinstance(tools, list) or not tools:
        raise BadLineError(f"{what} is not a non-empty list of function schemas")
    for j, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadLineError(f"{what}[{j}] is not a function schema with a name")
    return tools


def normalize_chat(messages, key="conversations", complete: bool = True):
    """(messages, tools): the messages checked and copied in the form chat templates take (null keys dropped, tool
    calls parsed, tools lifted out of the system message), the tools list or None.

    Order: [system] user, then assistant turns; an assistant turn with tool calls is followed by tool results and
    then another assistant turn; a plain one by a user turn. complete=True (training rows): the chat ends with an
    assistant turn that has content or tool calls. complete=False (prompts): it may end anywhere after a user turn,
    or with an empty assistant turn (rlaif.jsonl leaves the last reply empty on purpose)."""
    if not isinstance(messages, list) or not messages:
        raise BadLineError(f'"{key}" is not a non-empty list')
    out, tools = [], None
    for i, m in enumerate(messages):
        where = f"{key}[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadLineError(f"{where} is not a message with a role in {ROLES}")
        m = {k: v for k, v in m.items() if v is not None}
        role = m["role"]
        if not isinstance(m.get("content", ""), str):
            raise BadLineError(f"{where} ({role}) content is not a string")
        m["content"] = m.get("content", "")
        if role == "system":
            if i:
                raise BadLineError(f"{where}: a system message may only come first")
            declared = m.pop("tools", None) or m.pop("functions", None)
            if declared:
                tools = normalize_tools(declared, f"{where} tools")
            elif not m["content"].strip():
                raise BadLineError(f"{where} (system) has empty content")
        elif role == "user" and not m["content"].strip():
            raise BadLineError(f"{where} (user) has empty content")
        elif role == "assistant":
            if "reasoning_content" in m and not isinstance(m["reasoning_content"], str):
                raise BadLineError(f"{where} reasoning_content is not a string")
            if m.get("tool_calls") in ("", []):
                m.pop("tool_calls")
            if "tool_calls" in m:
                calls = _json_field(m["tool_calls"], f"{where} tool_calls")
                if not isinstance(calls, list):
                    calls = [calls]
                m["tool_calls"] = [normalize_tool_call(c, f"{where} tool_calls[{j}]") for j, c in enumerate(calls)]
            m.pop("tools", None)
        out.append(m)
    _check_order(out, key, complete)
    return out, tools


def _check_order(messages, key, complete):
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    if not body or body[0] != "user":
        raise BadLineError(f"{key} roles {roles}: the first turn after the system message must be the user's")
    start = len(roles) - len(body)
    for i in range(start, len(roles) - 1):
        m, nxt = messages[i], roles[i + 1]
        if m["role"] == "assistant":
            allowed = ("tool",) if m.get("tool_calls") else ("user",)
            if not m["content"].strip() and not m.get("tool_calls"):
                raise BadLineError(f"{key}[{i}] (assistant) has neither content nor tool calls")
        else:
            allowed = {"user": ("assistant",), "tool": ("tool", "assistant")}[m["role"]]
        if nxt not in allowed:
            raise BadLineError(f"{key} roles {roles}: {m['role']} at {i} is followed by {nxt}, expected "
                               f"{' or '.join(allowed)}")
    last = messages[-1]
    if complete:
        if last["role"] != "assistant":
            raise BadLineError(f"{key} roles {roles} do not end with an assistant turn")
        if not last["content"].strip() and not last.get("tool_calls"):
            raise BadLineError(f"{key}[{len(roles) - 1}] (assistant) has neither content nor tool calls")


def check_messages(messages, key="conversations") -> None:
    normalize_chat(messages, key)


def check_conversations(obj) -> None:
    if not isinstance(obj, dict) or "conversations" not in obj:
        raise BadLineError('missing key "conversations"')
    normalize_chat(obj["conversations"])


def check_prompt_row(obj) -> None:
    """A prompt for RL: conversations (a reference reply at the end optional, rlaif's empty last reply allowed) and
    an optional "gt": the accepted final answers (agent_rl*.jsonl)."""
    if not isinstance(obj, dict) or "conversations" not in obj:
        raise BadLineError('missing key "conversations"')
    normalize_chat(obj["conversations"], complete=False)
    if "gt" in obj and obj["gt"] is not None:
        gt = obj["gt"] if isinstance(obj["gt"], list) else [obj["gt"]]
        if not gt or not all(isinstance(g, (str, int, float)) and not isinstance(g, bool) for g in gt):
            raise BadLineError('"gt" is not a non-empty list of answers (strings or numbers)')


# ------------------------------------------------------------------------------------------------ rendering

def has_reasoning(message) -> bool:
    return isinstance(message.get("reasoning_content"), str) or "</think>" in message.get("content", "")


def row_chooses(seed: int, index: int, ratio: float) -> bool:
    """A fixed yes/no per row (same on every rank, epoch and resume): a seeded hash, not the global RNG."""
    if ratio <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2 ** 64 < ratio


# --system_prompt_ratio's prompts (MiniMind injects such a random system prompt into 20% of its SFT rows, so the model
# meets system messages of every kind and keeps answering the user)
SYSTEM_PROMPTS = (
    "你是一个乐于助人的AI助手。",
    "你是一个知识丰富的助手，请准确、简洁地回答用户的问题。",
    "你是一个友好的聊天伙伴，用自然的语气回答。",
    "请一步一步地思考，然后给出清楚的回答。",
    "You are a helpful assistant.",
    "You are a knowledgeable assistant. Answer accurately and concisely.",
    "You are a friendly AI. Reply in the language the user writes in.",
    "Think step by step, then answer clearly.",
)


def with_system_prompt(messages, seed, index: int, prompts=SYSTEM_PROMPTS) -> list:
    """A chat without a system message gets one of `prompts` (a fixed pick per row) in front; others are kept."""
    if messages and messages[0]["role"] == "system":
        return messages
    digest = hashlib.blake2b(f"{seed}:pick:{index}".encode(), digest_size=8).digest()
    return [{"role": "system", "content": prompts[int.from_bytes(digest, "little") % len(prompts)]}, *messages]


def with_empty_think(messages) -> list:
    """Adaptive thinking as MiniMind trains it: assistant turns without reasoning get the empty think block, which
    the model learns to write when it answers without thinking (it is what a thinking-off prompt ends with)."""
    return [{**m, "reasoning_content": ""} if m["role"] == "assistant" and not has_reasoning(m) else m
            for m in messages]


# ------------------------------------------------------------------------------------------------ template fields

@dataclass(frozen=True)
class TemplateSupport:
    """Which of a row's fields a chat template writes into its text (True) or drops (False)."""
    reasoning: bool = True  # reasoning_content of the last assistant turn
    past_reasoning: bool = True  # ... of an assistant turn a later user turn follows
    tools: bool = True  # the tools list
    tool_calls: bool = True  # an assistant turn's tool_calls
    tool_results: bool = True  # tool turns

    def missing(self) -> list[str]:
        names = {"reasoning": "reasoning_content", "past_reasoning": "reasoning_content of earlier turns",
                 "tools": "tools", "tool_calls": "tool_calls", "tool_results": "tool turns"}
        return [names[k] for k, v in vars(self).items() if not v]


LOSABLE = ("reasoning_content", "empty think block", "tool result")  # what lost_fields counts, in this order
_PROBE = "zq7probe"  # text no template writes by itself
_SUPPORT: dict = {}


def _renders(tokenizer, messages, needle, tools=None) -> bool:
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    except Exception:  # a template that refuses the field (jinja's raise_exception) does not render it
        return False
    return needle in text


def template_support(tokenizer) -> TemplateSupport:
    """What this tokenizer's chat template renders, found by rendering one probe chat per field (cached per template)."""
    key = (json.dumps(tokenizer.chat_template, sort_keys=True), tokenizer.eos_token)
    if key not in _SUPPORT:
        user = {"role": "user", "content": "hi"}
        call = {"role": "assistant", "content": "",
                "tool_calls": [{"type": "function", "function": {"name": _PROBE + "call", "arguments": {}}}]}
        tool = {"type": "function", "function": {"name": _PROBE + "tool", "description": "",
                                                 "parameters": {"type": "object", "properties": {}}}}

        def reply(tag):
            return {"role": "assistant", "content": "ok", "reasoning_content": _PROBE + tag}

        _SUPPORT[key] = TemplateSupport(
            reasoning=_renders(tokenizer, [user, reply("last")], _PROBE + "last"),
            past_reasoning=_renders(tokenizer, [user, reply("past"), user, reply("last")], _PROBE + "past"),
            tools=_renders(tokenizer, [user], _PROBE + "tool", [tool]),
            tool_calls=_renders(tokenizer, [user, call], _PROBE + "call"),
            tool_results=_renders(tokenizer, [user, {**call, "content": "calling"},
                                              {"role": "tool", "content": _PROBE + "result"},
                                              {"role": "assistant", "content": "ok"}], _PROBE + "result"))
        if _SUPPORT[key].missing():
            log.info("the chat template does not render %s: written the way our template writes them "
                     "(docs/data.md, chat rows)", ", ".join(_SUPPORT[key].missing()))
    return _SUPPORT[key]


def tools_block(tools) -> str:
    """The tools list as our template (and Qwen's, MiniMind's) writes it into the system turn."""
    listed = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
            f"function signatures within <tools></tools> XML tags:\n<tools>{listed}\n</tools>\n\nFor each function "
            "call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def tool_call_text(call) -> str:
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return f'<tool_call>\n{{"name": "{fn["name"]}", "arguments": {args}}}\n</tool_call>'


def with_fallbacks(messages, tools, support: TemplateSupport):
    """(messages, tools) with every field the template cannot render moved into text it does render, written as our
    template writes it -- inside the assistant's own content where the field is the assistant's, so the labels
    cover exactly what they would with a template that knows the field."""
    out, results = [], None  # results: the user turn the tool results of the current run go into
    for m in messages:
        m = dict(m)
        if m["role"] == "assistant":
            content, think = m.get("content") or "", ""
            if not support.reasoning and isinstance(m.get("reasoning_content"), str):
                think = "<think>\n" + m.pop("reasoning_content").strip("\n") + "\n</think>\n\n"
            if not support.tool_calls and m.get("tool_calls"):
                content = "\n".join(([content] if content else []) + [tool_call_text(c) for c in m.pop("tool_calls")])
            if think or content != (m.get("content") or ""):  # otherwise the message stays as it came
                m["content"] = think + content
        elif m["role"] == "tool" and not support.tool_results:
            block = "<tool_response>\n" + (m.get("content") or "") + "\n</tool_response>"
            if out and out[-1] is results:  # consecutive results: one user turn, as Qwen's template does
                results["content"] += "\n" + block
                continue
            m = results = {"role": "user", "content": block}
        out.append(m)
    if tools and not support.tools:
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": (out[0]["content"] + "\n\n" if out[0]["content"] else "") + tools_block(tools)}
        else:
            out.insert(0, {"role": "system", "content": tools_block(tools)})
        tools = None
    return out, tools


def lost_fields(messages, text: str) -> list[int]:
    """Per LOSABLE field, how many of the row's turns the rendered `text` leaves out (a template may drop a field on
    some turns only, e.g. Qwen3's reasoning before the last user turn). By text search: a reasoning or a result
    that also appears elsewhere in the chat counts as rendered, and a dropped block is counted by "</think>"s."""
    reasoning = results = 0
    for m in messages:
        if m["role"] == "assistant" and isinstance(m.get("reasoning_content"), str):
            r = m["reasoning_content"].strip()
            reasoning += bool(r) and r not in text
        elif m["role"] == "tool" and m.get("content", "").strip():
            results += m["content"].strip() not in text
    blocks = sum(m["role"] == "assistant" and has_reasoning(m) for m in messages)
    empty = max(0, blocks - text.count("</think>") - reasoning)
    return [reasoning, empty, results]


def describe_lost(lost) -> str:
    return ", ".join(f"{name} x{int(n)}" for name, n in zip(LOSABLE, lost) if n)


def _common_prefix(a: str, b: str) -> str:
    return os.path.commonprefix([a, b])


class ChatEncoder:
    """Renders normalised messages with a tokenizer's template and finds what each assistant turn writes.

    Primary: a turn is the text that rendering messages[:i+1] adds to messages[:i] (exact for any template that
    renders earlier turns the same whatever follows: ours, both of MiniMind's, ChatML). Fallback for templates that
    rewrite earlier turns: the turns' role markers in the full text. A row neither maps is a BadLineError."""

    def __init__(self, tokenizer):
        self.tokenizer, self.eos = tokenizer, tokenizer.eos_token
        self.support = template_support(tokenizer)
        turns = []
        for s in _SENTINELS:
            chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": s}]
            before = self.render(chat[:1])
            full = self.render(chat)
            if not full.startswith(before):
                raise ValueError("the chat template renders a user turn differently once a reply follows it")
            turns.append(full[len(before):])
        self.header = _common_prefix(*turns)
        self.marker = self.header[:self.header.find("\n") + 1] if "\n" in self.header else self.header
        if not self.header:
            raise ValueError("cannot find the assistant header of the chat template")

    def render(self, messages, tools=None, add_generation_prompt=False, **kwargs) -> str:
        """The template's text, with what it cannot render written in (`with_fallbacks`)."""
        messages, tools = with_fallbacks(messages, tools, self.support)
        try:
            return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt, **kwargs)
        except TemplateError as e:  # e.g. a template that raises on a system turn: the row is reported, not a crash
            raise BadLineError(f"the chat template refuses this chat: {e}") from None

    def spans(self, messages, tools, text) -> list[tuple[int, int]]:
        """(start, end) characters of what each assistant turn writes: header excluded, closing eos included."""
        try:
            return self._spans_by_prefix(messages, tools, text)
        except _Unmapped:
            return self._spans_by_marker(messages, text)

    def _turn_span(self, turn: str, offset: int) -> tuple[int, int]:
        start = len(_common_prefix(turn, self.header))
        end = turn.rfind(self.eos) if self.eos else -1
        end = len(turn.rstrip()) if end < start else end + len(self.eos)
        return offset + start, offset + end

    def _spans_by_prefix(self, messages, tools, text):
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, upto = self.render(messages[:i], tools), self.render(messages[:i + 1], tools)
            if not (upto.startswith(before) and text.startswith(upto)):
                raise _Unmapped
            spans.append(self._turn_span(upto[len(before):], len(before)))
        return spans

    def _spans_by_marker(self, messages, text):
        n = sum(m["role"] == "assistant" for m in messages)
        starts, i = [], text.find(self.marker)
        while i >= 0:
            starts.append(i)
            i = text.find(self.marker, i + len(self.marker))
        if len(starts) != n:
            raise BadLineError(f"chat template output cannot be mapped to the {n} assistant turn(s) "
                               f"({len(starts)} {self.marker!r} found)")
        spans = []
        for s in starts:
            end = text.find(self.eos, s + len(self.marker))
            end = len(text) if end < 0 else end + len(self.eos)
            spans.append(self._turn_span(text[s:end], s))
        return spans

    def encode(self, messages, tools=None, max_seq_len: int = 512, last_reply_only: bool = False, mark=()) -> dict:
        """input_ids and labels (-100 everywhere but what the assistant turns write), truncated to max_seq_len.
        last_reply_only: label only the final turn (the reply a preference pair compares).
        mark: strings (e.g. "<think>") whose occurrences inside the labelled turns are returned as a bool "marked"
        tensor over the tokens that cover them -- by characters, so it is right however the tokenizer splits them.
        A row whose rendering still leaves a field out gets "lost": counts per LOSABLE field (see report_lost)."""
        text = self.render(messages, tools)
        spans = self.spans(messages, tools, text)
        if last_reply_only:
            spans = spans[-1:]
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        labels, span = [], 0
        for tok, (start, _) in zip(enc["input_ids"], enc["offset_mapping"]):
            while span < len(spans) and start >= spans[span][1]:
                span += 1
            inside = span < len(spans) and spans[span][0] <= start < spans[span][1]
            labels.append(tok if inside else -100)
        out = {"input_ids": torch.tensor(enc["input_ids"][:max_seq_len]),
               "labels": torch.tensor(labels[:max_seq_len])}
        if mark:
            found = [(i, i + len(m)) for s, e in spans for m in mark for i in _find_all(text, m, s, e)]
            marked = [label != -100 and any(a < fe and b > fs for fs, fe in found)
                      for label, (a, b) in zip(labels, enc["offset_mapping"])]
            out["marked"] = torch.tensor(marked[:max_seq_len], dtype=torch.bool)
        lost = lost_fields(messages, text)
        if any(lost):
            out["lost"] = torch.tensor(lost)
        return out


class _Unmapped(Exception):
    pass


def _find_all(text: str, sub: str, start: int, end: int):
    i = text.find(sub, start, end)
    while i >= 0:
        yield i
        i = text.find(sub, i + len(sub), end)
