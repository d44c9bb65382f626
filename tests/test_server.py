"""scripts/serve_openai_api.py: the real server on a loopback port, driven by the official openai client (stream and
not) and raw HTTP for bad input; max_tokens honoured, stop strings cut, concurrent requests all answered alike."""

import gc
import json
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from helpers import ScriptedLM, load_script, make_model
from openai import OpenAI

from demo import metrics
from inference import Engine, Sampling, StreamSplitter, cut_at_stop

server = load_script("scripts/serve_openai_api.py")
QUESTION = [{"role": "user", "content": "中国的首都是哪里？"}]


@pytest.fixture(scope="module")
def base_url():
    from transformers import AutoTokenizer

    from model import TOKENIZER_DIR

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    with server.serve_in_background(server.create_app(tiny(), tokenizer, "microlm-test", max_tokens_cap=64)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0)


def tiny():
    # untied head: a random tied model only repeats its last input token ("\n"), which shows nothing here
    return make_model("tiny", seed=3, tie_word_embeddings=False)


def greedy(tokenizer, n):
    return metrics.generate_replies(tiny(), tokenizer, [QUESTION], n)[0]


def test_models_health_and_page(base_url, client):
    assert [m.id for m in client.models.list().data] == ["microlm-test"]
    assert httpx.get(base_url + "/health").json()["status"] == "ok"
    page = httpx.get(base_url + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text


def test_non_stream_is_greedy_generation_and_honours_max_tokens(client, tokenizer):
    r = client.chat.completions.create(model="microlm-test", messages=QUESTION, temperature=0, max_tokens=7)
    assert r.choices[0].message.content == greedy(tokenizer, 7).strip()
    assert r.usage.completion_tokens <= 7 and r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True,
                                                                      return_dict=False))
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 7


def test_stream_deltas_add_up_to_the_non_stream_answer(client):
    kwargs = dict(model="microlm-test", messages=QUESTION, temperature=0, max_tokens=12)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == full and chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_stop_string_cuts_the_answer(client):
    kwargs = dict(model="microlm-test", messages=QUESTION, temperature=0, max_tokens=12)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    stop = full[3:5]
    cut = client.chat.completions.create(stop=[stop], **kwargs)
    assert cut.choices[0].message.content == full[:full.find(stop)].strip()
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(stream=True, stop=stop, **kwargs) if c.choices)
    assert streamed.strip() == full[:full.find(stop)].strip()


def test_concurrent_requests_are_all_answered_alike(client):
    def ask(_):
        return client.chat.completions.create(model="microlm-test", messages=QUESTION, temperature=0,
                                              max_tokens=10).choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(6)))
    assert len(set(answers)) == 1


@pytest.mark.parametrize("body,needle", [
    (b"{not json", "not valid JSON"),
    (json.dumps({"messages": []}), "non-empty list"),
    (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}), "messages[0]"),
    (json.dumps({"messages": [{"role": "user", "content": "  "}]}), "empty content"),
    (json.dumps({"messages": QUESTION, "temperature": 5}), "'temperature'"),
    (json.dumps({"messages": QUESTION, "max_tokens": 100000}), "'max_tokens'"),
    (json.dumps({"messages": QUESTION + [{"role": "assistant", "content": "x"}]}), "last message"),
])
def test_bad_requests_get_a_400_with_a_json_error(base_url, body, needle):
    r = httpx.post(base_url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert needle in r.json()["error"]["message"]


def test_long_conversations_are_cut_from_the_left_to_fit_the_context(tokenizer):
    engine = Engine(tiny(), tokenizer, context=64)
    messages = [{"role": "user", "content": "很长的问题 " * 40}, {"role": "assistant", "content": "好"},
                {"role": "user", "content": "最后的问题"}]
    ids = engine.prompt_ids(engine.render(messages), max_new_tokens=16)
    assert len(ids) == 48 and tokenizer.decode(ids).endswith("最后的问题<|im_end|>\n<|im_start|>assistant\n")
    short = engine.prompt_ids(engine.render(QUESTION), max_new_tokens=16)
    assert tokenizer.decode(short).startswith("<|im_start|>user")  # nothing cut when it fits


def test_request_limits_follow_the_served_models_context(tokenizer):
    """A 64-token model: max_tokens may ask for half the context at most (the default too), and a long prompt is cut
    from the left so prompt and reply fit the context together."""
    from fastapi.testclient import TestClient

    model = make_model("tiny", seed=3, tie_word_embeddings=False, max_position_embeddings=64)
    url, long = "/v1/chat/completions", [{"role": "user", "content": "很长的问题 " * 60}]
    with TestClient(server.create_app(model, tokenizer, "small", max_tokens_cap=2048)) as c:
        refused = c.post(url, json={"messages": QUESTION, "max_tokens": 33})
        assert refused.status_code == 400 and "[1, 32]" in refused.json()["error"]["message"]
        for extra, room in (({"max_tokens": 20}, 44), ({}, 32)):  # the default max_tokens is the cap here
            r = c.post(url, json={"messages": long, "temperature": 0, **extra})
            usage = r.json()["usage"]
            assert r.status_code == 200 and usage["prompt_tokens"] == room and usage["completion_tokens"] <= 64 - room


def test_openai_request_forms_reach_the_sampler():
    """Text-part lists as content, max_completion_tokens for max_tokens, and top_p: each arrives where it acts."""
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "中国的"}, {"type": "text", "text": "首都？"}]}],
            "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.3}
    kwargs = server.reply_kwargs(server.parse_request(json.dumps(body).encode(), 64))
    assert kwargs["sampling"] == Sampling(max_new_tokens=7, temperature=0.5, top_p=0.3)
    req = server.parse_request(json.dumps(body).encode(), 64)
    assert req["messages"][0]["content"] == "中国的首都？"
    greedy = server.reply_kwargs(server.parse_request(json.dumps({**body, "temperature": 0}).encode(), 64))
    assert greedy["sampling"].top_p == 1.0  # greedy: nothing to cut


def test_think_part_becomes_reasoning_content():
    text = "<think>\n3加5等于8。\n</think>\n<answer>\n8\n</answer>"
    assert server.split_reasoning(text) == ("3加5等于8。", "8")
    assert server.split_reasoning("plain answer") == (None, "plain answer")
    assert cut_at_stop("abc. def", [".", "x"]) == ("abc", True)


@pytest.mark.parametrize("cuts", [[], [3, 9, 17, 30, 41], list(range(1, 60))])
def test_streamed_think_tags_are_routed_wherever_the_tokens_split_them(cuts):
    text = "<think>\n3加5等于8。\n</think>\n<answer>\n8 < 9\n</answer>"
    pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
    router = StreamSplitter()
    routed = [out for piece in pieces for out in router.feed(piece)] + router.flush()
    reasoning = "".join(t for field, t in routed if field == "reasoning_content")
    content = "".join(t for field, t in routed if field == "content")
    assert (reasoning.strip(), content.strip()) == server.split_reasoning(text) == ("3加5等于8。", "8 < 9")


def _rss_mib():
    """Resident memory after handing freed heap pages back to the OS (so allocator caching is not counted)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.e2e
def test_a_flood_of_good_and_bad_requests_leaves_the_server_up_with_bounded_memory(base_url):
    url = base_url + "/v1/chat/completions"
    huge = [{"role": "user", "content": "很长的问题 " * 20000}]  # far beyond the context: cut from the left
    bodies = [b"{not json", json.dumps({"messages": "wrong type"}),
              json.dumps({"messages": QUESTION, "max_tokens": 10**9}),
              json.dumps({"messages": QUESTION, "temperature": "hot"}),
              json.dumps({"messages": QUESTION, "max_tokens": 2}),
              json.dumps({"messages": QUESTION, "max_tokens": 2, "stream": True}),
              json.dumps({"messages": huge, "max_tokens": 2})]

    def send(i):
        body = bodies[i % len(bodies)]
        return httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=120).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(send, range(70)))  # warm-up: thread pools, tokenizer caches
        before = _rss_mib()
        for _ in range(4):
            codes += list(pool.map(send, range(70)))
    growth = _rss_mib() - before
    assert set(codes) <= {200, 400} and codes.count(200) == 3 * 50  # every good request answered
    # allocator arenas across 8 threads wander by tens of MiB; a leak of one request's KV cache (~2 MiB here) or of one
    # tokenized huge prompt would add hundreds over 280 requests
    assert growth < 128, f"resident memory grew by {growth:.0f} MiB over 280 requests"
    assert httpx.get(base_url + "/health").json()["status"] == "ok"


THINKING_REPLY = "<think>\n3加5等于8。\n</think>\n\n8 < 9"


@pytest.fixture(scope="module")
def scripted(tokenizer):
    lm = ScriptedLM(tokenizer, lambda prompt: THINKING_REPLY, delay=0.004)
    with server.serve_in_background(server.create_app(lm, tokenizer, "scripted", max_tokens_cap=64)) as url:
        yield lm, OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def test_reasoning_content_through_the_openai_client_stream_and_not(scripted):
    _, client = scripted
    kwargs = dict(model="scripted", messages=QUESTION, max_tokens=60)
    message = client.chat.completions.create(**kwargs).choices[0].message
    assert (message.reasoning_content, message.content) == ("3加5等于8。", "8 < 9")
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert (reasoning.strip(), content.strip()) == ("3加5等于8。", "8 < 9")
    assert not any("<think>" in (d.content or "") + (getattr(d, "reasoning_content", None) or "") for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_the_lock_lets_one_request_at_a_time_reach_the_model(scripted):
    lm, client = scripted

    def ask(i):
        kwargs = dict(model="scripted", messages=QUESTION, max_tokens=60)
        if i % 2:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True,
                                                                                                    **kwargs)
                           if c.choices).strip()
        return client.chat.completions.create(**kwargs).choices[0].message.content

    lm.most_at_once = 0
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(12)))
    assert answers == ["8 < 9"] * 12
    assert lm.most_at_once == 1  # without the lock, overlapping requests would share the model (and its cache)


@pytest.mark.e2e
def test_requests_leave_no_tensors_behind(client):
    """Live torch tensors before and after 20 requests (stream and not) on the real model: a KV cache or a streamer
    kept per request would show up here, which the RSS of a shared test process cannot resolve."""
    def live():
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    def ask(i):
        kwargs = dict(model="microlm-test", messages=QUESTION, temperature=0, max_tokens=12)
        if i % 2:
            return list(client.chat.completions.create(stream=True, **kwargs))
        return client.chat.completions.create(**kwargs)

    for i in range(4):
        ask(i)
    before = live()
    for i in range(20):
        ask(i)
    assert live() - before <= 2, live() - before


# ----------------------------------------------------------------------------------------------------- tool calls

CALC = {"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
                                         "parameters": {"type": "object", "properties": {
                                             "expression": {"type": "string"}}, "required": ["expression"]}}}
ASK = [{"role": "user", "content": "37加25等于几？"}]


def tool_script(prompt):
    """A model that has learnt the protocol: with tools it calls the calculator, with a tool result it answers."""
    if "<tool_response>" in prompt:
        result = prompt.rsplit("<tool_response>\n", 1)[1].split("\n</tool_response>")[0]
        return f"37加25等于{result}。"
    if prompt.endswith('"arguments": '):  # tool_choice named the function: the call is already open
        return '{"expression": "37+25"}}\n</tool_call>'
    if prompt.endswith('{"name": "'):  # tool_choice required
        return 'calculator", "arguments": {"expression": "37+25"}}\n</tool_call>'
    if "<tools>" in prompt:
        return '<tool_call>\n{"name": "calculator", "arguments": {"expression": "37+25"}}\n</tool_call>'
    if "malformed" in prompt:
        return '<tool_call>\n{"name": "calculator", "arguments": {oops}\n</tool_call>'
    if prompt.endswith("<think>\n"):
        return "先想一想。\n</think>\n\n62"
    return "不用工具。"


@pytest.fixture(scope="module")
def tooled(tokenizer):
    lm = ScriptedLM(tokenizer, tool_script)
    prompts = lm.prompts
    with server.serve_in_background(server.create_app(lm, tokenizer, "scripted", max_tokens_cap=64)) as url:
        yield prompts, url, OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def test_a_tool_round_trip_through_the_openai_client_stream_and_not(tooled):
    """request with tools -> tool_calls -> the client runs the call and sends the result -> the final answer."""
    from inference import run_tool

    prompts, _, client = tooled
    for stream in (False, True):
        if stream:  # the openai client's stream helper assembles the streamed deltas into the message
            with client.chat.completions.stream(model="scripted", messages=ASK, tools=[CALC], max_tokens=60) as s:
                deltas = [e for e in s if e.type == "tool_calls.function.arguments.delta"]
                completion = s.get_final_completion()
            assert deltas  # the arguments came as stream deltas
        else:
            completion = client.chat.completions.create(model="scripted", messages=ASK, tools=[CALC], max_tokens=60)
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        call = choice.message.tool_calls[0]
        assert call.id.startswith("call_") and call.function.name == "calculator"
        assert json.loads(call.function.arguments) == {"expression": "37+25"}
        assert "<tools>" in prompts[-1] and '"name": "calculator"' in prompts[-1]
        result = run_tool(call.function.name, json.loads(call.function.arguments))
        followup = ASK + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": result}]
        final = client.chat.completions.create(model="scripted", messages=followup, tools=[CALC], max_tokens=60)
        assert final.choices[0].message.content == "37加25等于62。" and final.choices[0].finish_reason == "stop"
        # the call went back into the prompt as the model wrote it, the result as a tool response
        assert '<tool_call>\n{"name": "calculator", "arguments": {"expression": "37+25"}}\n</tool_call>' in prompts[-1]
        assert "<tool_response>\n62\n</tool_response>" in prompts[-1]


def test_tool_choice_none_required_and_named(tooled):
    prompts, _, client = tooled
    kwargs = dict(model="scripted", messages=ASK, tools=[CALC], max_tokens=60)
    none = client.chat.completions.create(tool_choice="none", **kwargs).choices[0]
    assert "<tools>" not in prompts[-1] and none.message.content == "不用工具。" and not none.message.tool_calls
    for choice in ("required", {"type": "function", "function": {"name": "calculator"}}):
        forced = client.chat.completions.create(tool_choice=choice, **kwargs).choices[0]
        assert forced.finish_reason == "tool_calls"
        assert json.loads(forced.message.tool_calls[0].function.arguments) == {"expression": "37+25"}
        assert prompts[-1].endswith('<tool_call>\n{"name": "' + ("" if choice == "required" else
                                                                   'calculator", "arguments": '))


def test_a_malformed_call_comes_back_as_content_not_an_error(tooled):
    _, _, client = tooled
    messages = [{"role": "user", "content": "malformed please"}]
    for stream in (False, True):
        if stream:
            chunks = list(client.chat.completions.create(model="scripted", messages=messages, max_tokens=60,
                                                         stream=True))
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
            finish = chunks[-1].choices[0].finish_reason
        else:
            choice = client.chat.completions.create(model="scripted", messages=messages, max_tokens=60).choices[0]
            content, finish = choice.message.content, choice.finish_reason
            assert not choice.message.tool_calls
        assert "{oops}" in content and "<tool_call>" in content and finish == "stop"


def test_thinking_is_switched_per_request(tooled):
    prompts, url, client = tooled
    on = client.chat.completions.create(model="scripted", messages=QUESTION, max_tokens=60,
                                        extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert prompts[-1].endswith("<|im_start|>assistant\n<think>\n")
    # the prompt opened the think part, so the reply's text up to </think> is reasoning
    assert (on.choices[0].message.reasoning_content, on.choices[0].message.content) == ("先想一想。", "62")
    client.chat.completions.create(model="scripted", messages=QUESTION, max_tokens=60,
                                   extra_body={"open_thinking": False})
    assert prompts[-1].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    client.chat.completions.create(model="scripted", messages=QUESTION, max_tokens=60)
    assert prompts[-1].endswith("<|im_start|>assistant\n")  # unset: the model decides


@pytest.mark.parametrize("extra,needle", [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0]"),
    ({"tools": {"name": "calculator"}}, "'tools' must be a list"),
    ({"tools": [CALC, CALC]}, "unique"),
    ({"tools": [CALC], "tool_choice": {"type": "function", "function": {"name": "weather"}}}, "not in 'tools'"),
    ({"tool_choice": "required"}, "no 'tools'"),
    ({"tools": [CALC], "tool_choice": "sometimes"}, "'tool_choice' must be"),
    ({"messages": ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": "{not json"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "62"}]}, "not valid JSON"),
    ({"messages": ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": "{}"}}]},
        {"role": "tool", "content": "62"}]}, "tool_call_id"),
    ({"chat_template_kwargs": {"enable_thinking": "yes"}}, "enable_thinking"),
])
def test_bad_tool_requests_get_a_400_with_a_json_error(tooled, extra, needle):
    _, url, _ = tooled
    r = httpx.post(url + "/v1/chat/completions", json={"messages": ASK, **extra})
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
