"""The one inference core: every place that runs a model -- the terminal chat, the server, the evaluation and the RL
rollouts -- decodes through `decode()` here, and chats through `Engine`.

    decode / generate   token ids in, token ids out: batched, left-padded, KV cache, sampling on the device
    Engine              messages in: chat template (tools, thinking switch), prompt cut to the context, streamed
                        text split into reasoning / content / tool calls, and the tool loop

The model package knows nothing of this; this package knows nothing of files (see load.py), training or HTTP.
"""

import json
import uuid
from dataclasses import dataclass, field

import torch

from dataset.chat import template_support, with_fallbacks
from dataset.sft import pad_id_of

from .toolcalls import parse_tool_calls
from .tools import run_tool, tool_schema


# ------------------------------------------------------------------------------------------------ token level

@dataclass
class Sampling:
    """temperature 0 = greedy; top_k 0 and top_p 1 = off; repetition_penalty as in CTRL (and transformers)."""
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0


def penalise(logits, s: Sampling, seen=None):
    """Repetition penalty (CTRL's, as transformers applies it): a seen token's logit is divided by the penalty where
    positive and multiplied where negative, so it always becomes less likely."""
    if s.repetition_penalty == 1.0 or seen is None:
        return logits
    penalised = torch.where(logits < 0, logits * s.repetition_penalty, logits / s.repetition_penalty)
    return torch.where(seen, penalised, logits)


def warp(logits, s: Sampling):
    """The logits a sample is drawn from: divided by the temperature, then -inf outside top-k and top-p."""
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:  # drop the least likely tokens whose total probability is below 1 - top_p; keep at least one
        sorted_logits, order = torch.sort(logits, dim=-1)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - s.top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def next_token(logits, s: Sampling, seen=None, generator=None):
    """(B,) next tokens from (B, V) float logits; `seen`: (B, V) bool of the tokens so far (repetition penalty)."""
    logits = penalise(logits, s, seen)
    if s.temperature <= 0:
        return logits.argmax(-1)
    return sample(warp(logits, s).softmax(-1), generator)


def sample(probs, generator=None):
    """(B,) one draw per row of (B, V) probabilities, by the inverse of each row's CDF: one uniform number a row.
    torch.multinomial draws V exponentials a row instead, which on a CPU took half of a rollout's decode time (RL
    samples 128 rows x 6,400 tokens a step on the demo). A token of probability 0 is never drawn: the draw is the
    first token whose cumulative probability exceeds u * total, and u * total stays below the total."""
    cdf = probs.float().cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device)
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


class KVCache:
    """Keys and values of every layer in one pre-allocated buffer, written in place; a layer reads back the filled
    part only, so attention needs no mask without padding. What `decode` uses for our own models: no per-step
    concatenation as in transformers' DynamicCache (which stock models keep)."""

    def __init__(self, num_layers: int, max_len: int):
        self.num_layers, self.max_len, self.length = num_layers, max_len, 0
        self.keys = self.values = None

    def update(self, k, v, layer_idx: int):
        B, H, T, D = k.shape
        if self.keys is None:  # shape and dtype from the first layer's keys
            self.keys = k.new_empty(self.num_layers, B, H, self.max_len, D)
            self.values = v.new_empty(self.num_layers, B, H, self.max_len, D)
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions is full")
        self.keys[layer_idx, :, :, self.length:end] = k
        self.values[layer_idx, :, :, self.length:end] = v
        if layer_idx == self.num_layers - 1:
            self.length = end
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple:
        return self.length + query_length, 0


def _forward(model, ids, position_ids, attention_mask, cache):
    out = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float()


def _steps(model, input_ids, attention_mask, sampling, eos_id, pad_id, static_cache, cache_len, step, generator,
           stop_check):
    """(token, done) per step; stops once every row is done, looking every `stop_check` steps (a look is a host
    sync: on a GPU the loop runs ahead of the device between looks)."""
    from transformers import DynamicCache, StaticCache

    B, T = input_ids.shape
    device = input_ids.device
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
    padded = not bool(mask.all())  # without padding, the steps need no mask at all
    n_new = sampling.max_new_tokens
    if static_cache:
        cache_len = max(cache_len or 0, T + n_new)
        cache = StaticCache(config=model.config, max_cache_len=cache_len)
        keys = torch.zeros(B, cache_len, dtype=torch.bool, device=device)
        keys[:, :T] = mask.bool()
    elif getattr(model.config, "model_type", None) == "microlm":
        cache = KVCache(model.config.num_hidden_layers, T + n_new)
    else:
        cache = DynamicCache(config=model.config)
    step = model if step is None else step
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = _forward(model, input_ids, positions, mask if padded else None, cache)
    seen = None
    if sampling.repetition_penalty != 1.0:
        seen = torch.zeros(B, logits.size(-1), dtype=torch.bool, device=device)
        seen.scatter_(1, input_ids * mask, mask.bool())
    done = torch.zeros(B, dtype=torch.bool, device=device)
    position = positions[:, -1:]
    for i in range(n_new):
        token = next_token(logits, sampling, seen, generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        if eos_id is not None:
            done = done | (token == eos_id)
        yield token, done
        if i == n_new - 1 or ((i + 1) % stop_check == 0 and bool(done.all())):
            return
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        position = position + 1
        if static_cache:
            keys[:, T + i] = True
            logits = _forward(step, token[:, None], position, keys[:, None, None, :], cache)
        else:
            if padded:
                mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            logits = _forward(step, token[:, None], position, mask if padded else None, cache)


@torch.inference_mode()  # lighter than no_grad per op (no version counters): ~10% of a CPU decode step
def decode(model, input_ids, attention_mask=None, sampling: Sampling = Sampling(), eos_id=None, pad_id=0,
           static_cache=False, cache_len=None, step=None, generator=None):
    """Yields the (B,) next tokens step by step until every row has ended with `eos_id` or `max_new_tokens` are out;
    an ended row yields `pad_id`. Rows are left-padded (`attention_mask` 0 on the left); positions count from each
    row's first real token, so a row decodes as it would alone. Close the generator to stop early.

    The prompt is prefilled once; each step then feeds one token per row on the KV cache (pre-allocated: our
    `KVCache` for our models, transformers' DynamicCache for others). static_cache: transformers' StaticCache and a
    (B, 1, 1, kv) mask of fixed shape, so `step` (e.g. a torch.compile'd model) sees the same shapes every step
    (`cache_len`: its size, at least prompt + max_new_tokens). Any transformers causal LM works (position_ids,
    cache, logits_to_keep)."""
    for token, _ in _steps(model, input_ids, attention_mask, sampling, eos_id, pad_id, static_cache, cache_len, step,
                           generator, stop_check=1):
        yield token


def generate(model, input_ids, attention_mask=None, sampling: Sampling = Sampling(), eos_id=None, pad_id=0,
             static_cache=False, cache_len=None, step=None, generator=None, stop_check=8):
    """(B, n) new tokens (n <= max_new_tokens), `pad_id` after each row's eos: the decode loop run to the end, the
    host looking whether every row is done only every `stop_check` steps (steps past that are cut off)."""
    with torch.inference_mode():
        tokens, dones = [], []
        for token, done in _steps(model, input_ids, attention_mask, sampling, eos_id, pad_id, static_cache,
                                  cache_len, step, generator, stop_check):
            tokens.append(token)
            dones.append(done)
        if tokens:
            all_done = torch.stack(dones).all(1).tolist()
            n = all_done.index(True) + 1 if True in all_done else len(tokens)
            out = torch.stack(tokens[:n], 1)
        else:
            out = input_ids.new_zeros(input_ids.size(0), 0)
    return out.clone()  # an ordinary tensor: RL trains on rollouts, and an inference tensor cannot enter autograd


def left_pad(rows, pad_id, device=None):
    """(input_ids, attention_mask) of lists of token ids, padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


# ------------------------------------------------------------------------------------------------ text level

class StreamSplitter:
    """Streamed text to (field, text) pieces: inside <think>...</think> to "reasoning_content", a whole
    <tool_call>...</tool_call> block to "tool_call" once it closes, the rest to "content" with the <answer> tags
    dropped. A tail that may be the start of a tag split across tokens waits for the next text; a call block never
    closed comes back as content at the end."""

    OPEN = ("<think>", "<answer>", "</answer>", "<tool_call>")

    def __init__(self, thinking=False, tools=True):
        self.mode = "reasoning_content" if thinking else "content"
        self.tools, self.pending = tools, ""

    def _tags(self):
        if self.mode == "reasoning_content":
            return ("</think>",)
        if self.mode == "tool_call":
            return ("</tool_call>",)
        return self.OPEN if self.tools else self.OPEN[:3]

    def feed(self, text: str) -> list:
        self.pending += text
        out = []
        while self.pending:
            tags = self._tags()
            hits = [(self.pending.find(t), t) for t in tags if t in self.pending]
            if hits:
                i, tag = min(hits)
                if self.mode == "tool_call":
                    out.append(("tool_call", self.pending[:i]))
                elif i:
                    out.append((self.mode, self.pending[:i]))
                self.pending = self.pending[i + len(tag):]
                self.mode = {"<think>": "reasoning_content", "<tool_call>": "tool_call"}.get(tag, "content")
                continue
            if self.mode == "tool_call":  # a call is only handed on whole
                break
            hold = max((k for t in tags for k in range(1, len(t)) if self.pending.endswith(t[:k])), default=0)
            cut = len(self.pending) - hold
            if cut:
                out.append((self.mode, self.pending[:cut]))
            self.pending = self.pending[cut:]
            break
        return out

    def flush(self) -> list:
        text = "<tool_call>" + self.pending if self.mode == "tool_call" else self.pending
        out = [("content" if self.mode == "tool_call" else self.mode, text)] if text else []
        self.pending, self.mode = "", "content"
        return out


def split_reasoning(text: str, thinking=False) -> tuple:
    """(reasoning_content or None, content) of a whole reply, exactly as the stream splitter routes it."""
    splitter = StreamSplitter(thinking, tools=False)
    pieces = splitter.feed(text) + splitter.flush()
    reasoning = "".join(t for f, t in pieces if f == "reasoning_content")
    content = "".join(t for f, t in pieces if f == "content")
    return (reasoning.strip() if thinking or "<think>" in text else None), content.strip()


class TextStream:
    """Token ids to text deltas: the whole reply is decoded each time (a byte-level BPE token can end inside a UTF-8
    character, so an unfinished character, shown as U+FFFD, waits for the next token)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[self.sent:], len(text)
        return delta


def cut_at_stop(text: str, stop) -> tuple:
    """(text before the first stop string, whether one was found)."""
    cuts = [text.find(s) for s in stop if s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


@dataclass
class Reply:
    text: str = ""  # everything generated, tags included (after a forced prefix)
    reasoning: str | None = None
    content: str = ""
    tool_calls: list = field(default_factory=list)  # OpenAI's form, arguments a JSON string, with ids
    errors: list = field(default_factory=list)  # malformed calls (their text is in content)
    finish_reason: str = "stop"  # stop | length | tool_calls
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def message(self) -> dict:
        """The assistant message for the next prompt (and for OpenAI's response)."""
        m = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            m["reasoning_content"] = self.reasoning
        if self.tool_calls:
            m["tool_calls"] = self.tool_calls
        return m


def _openai_call(call) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["function"]["name"],
                         "arguments": json.dumps(call["function"]["arguments"], ensure_ascii=False)}}


CACHE_BUCKET = 256  # compiled decoding: static caches come in multiples of this, so few shapes ever compile


class Engine:
    """A model and its tokenizer, chatting. Not thread-safe: the server keeps one request at a time on it."""

    def __init__(self, model, tokenizer, context=None, compile=False, sampler=None):
        self.model, self.tokenizer, self.sampler = model, tokenizer, sampler
        self.context = context or getattr(model.config, "max_position_embeddings", 2048)
        self.eos_id, self.pad_id = tokenizer.eos_token_id, pad_id_of(tokenizer)
        self.support = template_support(tokenizer)  # what its chat template cannot render (with_fallbacks)
        # compile: a static cache whose length is rounded up, so one compiled step serves many prompt lengths
        self.step = torch.compile(model, dynamic=False) if compile else None

    @property
    def device(self):
        return next(self.model.parameters()).device

    # ---- prompts

    def render(self, messages, tools=None, thinking=None, prefix="") -> str:
        """The chat template's generation prompt (+ a forced start of the reply). thinking: True opens <think>,
        False writes the empty think block, None leaves it to the model. Fields the template cannot render are
        written in as training wrote them (dataset/chat.py's with_fallbacks)."""
        kwargs = {} if thinking is None else {"enable_thinking": thinking, "open_thinking": thinking}
        messages, tools = with_fallbacks(messages, tools or None, self.support)
        return self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                  tokenize=False, **kwargs) + prefix

    def prompt_ids(self, text: str, max_new_tokens: int, notice=None) -> list:
        """Token ids of a rendered prompt, cut from the left (the oldest turns go first) to leave room for
        max_new_tokens in the context."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        room = max(self.context - max_new_tokens, 1)
        if len(ids) > room:
            if notice:
                notice(f"[prompt of {len(ids)} tokens cut from the left to {room} to leave room for "
                       f"{max_new_tokens} new tokens in a {self.context}-token context]\n")
            ids = ids[-room:]
        return ids

    # ---- token ids

    def _batch(self, rows, sampling: Sampling) -> dict:
        ids, mask = left_pad(rows, self.pad_id, self.device)
        bucket = -(-(ids.size(1) + sampling.max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
        return dict(input_ids=ids, attention_mask=mask, sampling=sampling, eos_id=self.eos_id, pad_id=self.pad_id,
                    static_cache=self.step is not None, cache_len=bucket, step=self.step)

    def decode(self, rows, sampling: Sampling, generator=None):
        """`decode()` on lists of prompt ids (left-padded into one batch)."""
        return decode(self.model, **self._batch(rows, sampling), generator=generator)

    def generate(self, rows, sampling: Sampling, batch_size=32, generator=None) -> list:
        """[(new ids without eos, ended with eos)] for many prompts, batched by length so batches pad little.
        With a `sampler` (e.g. the vLLM rollout engine's), it generates them instead: sampler(rows, sampling)."""
        if self.sampler is not None:
            return self.sampler(rows, sampling)
        order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
        results = [None] * len(rows)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            new = generate(self.model, **self._batch([rows[i] for i in batch], sampling), generator=generator)
            for i, seq in zip(batch, new.tolist()):
                ended = self.eos_id in seq
                results[i] = (seq[:seq.index(self.eos_id)] if ended else seq, ended)
        return results

    # ---- one reply

    def stream_reply(self, messages, tools=None, thinking=None, sampling=Sampling(), stop=(), prefix="",
                     generator=None, notice=None):
        """Yields (field, text) events -- "reasoning_content", "content", "tool_call" (an OpenAI-style call) -- as the
        reply streams; returns the `Reply`. Stop strings end it early; a malformed call comes back as content; with
        `prefix` the reply is forced to start with that text (e.g. a tool call's opening)."""
        text = self.render(messages, tools, thinking, prefix)
        ids = self.prompt_ids(text, sampling.max_new_tokens, notice)
        opened = text.removesuffix(prefix).endswith("<think>\n")
        splitter, stream = StreamSplitter(thinking=opened, tools=bool(tools)), TextStream(self.tokenizer)
        reply = Reply(prompt_tokens=len(ids))
        hold = max((len(s) for s in stop), default=1) - 1
        raw, sent, finish = prefix, 0, "length"
        pieces = self.decode([ids], sampling, generator)
        try:
            for token in pieces:
                token = int(token[0])
                reply.completion_tokens += 1
                if token == self.eos_id:
                    finish = "stop"
                    break
                raw += stream.add(token)
                cut, stopped = cut_at_stop(raw, stop)
                if stopped:
                    raw, finish = cut, "stop"
                    break
                if len(raw) - hold > sent:
                    yield from self._route(splitter, raw[sent:len(raw) - hold], reply)
                    sent = len(raw) - hold
        finally:
            pieces.close()
        if len(raw) > sent:
            yield from self._route(splitter, raw[sent:], reply)
        for f, t in splitter.flush():
            yield from self._emit(f, t, reply)
        reply.text = raw
        reply.content = reply.content.strip()
        if reply.reasoning is not None:
            reply.reasoning = reply.reasoning.strip()
        reply.finish_reason = "tool_calls" if reply.tool_calls else finish
        return reply

    def _route(self, splitter, text, reply):
        for f, t in splitter.feed(text):
            yield from self._emit(f, t, reply)

    def _emit(self, f, t, reply):
        if f == "tool_call":
            _, calls, errors = parse_tool_calls(f"<tool_call>{t}</tool_call>")
            if errors:  # not a call: the model's text goes back to the user as it was written
                reply.errors += errors
                f, t = "content", f"<tool_call>{t}</tool_call>"
            else:
                for call in calls:
                    call = _openai_call(call)
                    reply.tool_calls.append(call)
                    yield "tool_call", call
                return
        if f == "reasoning_content":
            reply.reasoning = (reply.reasoning or "") + t
        else:
            reply.content += t
        yield f, t

    def reply(self, messages, **kwargs) -> Reply:
        return drain(self.stream_reply(messages, **kwargs))

    # ---- the tool loop

    def parse(self, text: str, thinking=False, tools=True) -> Reply:
        """A whole reply's text as the stream would have split it (reasoning, content, calls, malformed calls)."""
        splitter, reply = StreamSplitter(thinking, tools), Reply(text=text)
        for f, t in splitter.feed(text) + splitter.flush():
            for _ in self._emit(f, t, reply):
                pass
        reply.content = reply.content.strip()
        reply.reasoning = reply.reasoning.strip() if reply.reasoning is not None else None
        return reply

    # ---- the tool loop

    def run_tools(self, messages, functions, tools=None, max_rounds=4, timeout=10.0, **kwargs):
        """Chat with tools: each reply's calls run (`functions`: name -> callable) and their results go back as tool
        messages, for at most `max_rounds` rounds; then the model answers. Yields the reply events plus
        ("tool_result", tool message); returns (the new messages, the last Reply). tools: the schemas shown to the
        model (default: derived from `functions`)."""
        tools = tools or schemas_of(functions)
        new = []
        for round_ in range(max_rounds + 1):
            reply = yield from self.stream_reply(messages + new, tools=tools, **kwargs)
            new.append(reply.message())
            if not reply.tool_calls or round_ == max_rounds:
                return new, reply
            for message in tool_messages(reply.tool_calls, functions, timeout):
                new.append(message)
                yield "tool_result", message

    def run_tools_batch(self, chats, functions, tools=None, max_rounds=4, timeout=10.0, thinking=None,
                        sampling=Sampling(), batch_size=16) -> list:
        """`run_tools` for many chats at once, greedy or sampled, each round batched: [(new messages, first Reply,
        last Reply)]. functions: one {name: callable} for all chats or a list with one per chat; tools: one schema
        list per chat (None, or a None in it: the schemas of that chat's functions)."""
        n = len(chats)
        functions = functions if isinstance(functions, list) else [functions] * n
        tools = [t or schemas_of(f) for t, f in zip(tools or [None] * n, functions)]
        new, first, last, open_rows = [[] for _ in range(n)], [None] * n, [None] * n, list(range(n))
        for round_ in range(max_rounds + 1):
            if not open_rows:
                break
            texts = [self.render(list(chats[i]) + new[i], tools[i], thinking) for i in open_rows]
            rows = [self.prompt_ids(t, sampling.max_new_tokens) for t in texts]
            still_open = []
            for i, text, (ids, ended), n_prompt in zip(open_rows, texts, self.generate(rows, sampling, batch_size),
                                                       map(len, rows)):
                reply = self.parse(self.tokenizer.decode(ids, skip_special_tokens=False),
                                   text.endswith("<think>\n"), tools=bool(tools[i]))
                reply.prompt_tokens, reply.completion_tokens = n_prompt, len(ids) + ended
                reply.finish_reason = "tool_calls" if reply.tool_calls else "stop" if ended else "length"
                first[i] = first[i] or reply
                last[i] = reply
                new[i].append(reply.message())
                if reply.tool_calls and round_ < max_rounds:
                    new[i] += tool_messages(reply.tool_calls, functions[i], timeout)
                    still_open.append(i)
            open_rows = still_open
        return list(zip(new, first, last))

    def chat_with_tools(self, messages, functions, **kwargs):
        """(new messages, last Reply) of `run_tools`, without the events."""
        return drain(self.run_tools(messages, functions, **kwargs))


def schemas_of(functions) -> list:
    return [tool_schema(fn) for fn in functions.values()]


def tool_messages(calls, functions, timeout=10.0) -> list:
    """The tool messages answering a reply's calls: each call run, every failure turned into a message."""
    out = []
    for call in calls:
        fn = call["function"]
        try:
            arguments = json.loads(fn["arguments"])
        except ValueError as e:  # parsed calls are JSON; this guards calls handed in from outside
            result = f"error: arguments are not JSON: {e}"
        else:
            result = run_tool(fn["name"], arguments, functions, timeout=timeout)
        out.append({"role": "tool", "tool_call_id": call["id"], "name": fn["name"], "content": result})
    return out


def drain(events, on_event=None):
    """Runs an event generator to its end, handing each event to on_event(field, value); returns its result."""
    while True:
        try:
            event = next(events)
        except StopIteration as done:
            return done.value
        if on_event is not None:
            on_event(*event)
