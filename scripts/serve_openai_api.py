"""OpenAI-compatible chat server for any stage's checkpoint, with a web chat page at /.

    python scripts/serve_openai_api.py                          # out/sft on http://127.0.0.1:8998
    python scripts/serve_openai_api.py --stage reason --port 8000
    python scripts/serve_openai_api.py --stage lora --host 0.0.0.0   # listen beyond this machine (no auth!)

Endpoints: POST /v1/chat/completions (stream or not; temperature, top_p, max_tokens, stream, stop, tools,
tool_choice, chat_template_kwargs.enable_thinking / open_thinking), GET /v1/models, GET /health, GET / (the web chat).
OpenAI's tool-call protocol: `tools` are rendered into the prompt, the model's <tool_call> blocks come back as
`tool_calls` (finish_reason "tool_calls", streamed as OpenAI streams them), the client runs them and sends `tool`
messages with their `tool_call_id`; a malformed call comes back as plain content. A reasoning model's <think> part
comes back as `reasoning_content`. Requests are validated (400 with a JSON error), max_tokens and the prompt length
are capped, and generation runs one request at a time, so concurrent requests are all answered and never share a
cache. Everything model-side is the inference core (inference/engine.py); this file is HTTP.

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8998/v1", api_key="none")
    client.chat.completions.create(model="microlm", messages=[{"role": "user", "content": "你好"}])
"""

import argparse
import contextlib
import json
import queue
import re
import socket
import threading
import time
import uuid
from pathlib import Path

from common.cli import HelpFormatter
from dataset.jsonl import BadLineError
from dataset.chat import normalize_chat
from inference import Engine, Sampling, split_reasoning  # noqa: F401  (split_reasoning: tests and users)
from inference.load import add_model_args, load

ROLES = {"system", "user", "assistant", "tool"}
PAGE = Path(__file__).with_name("web_chat.html")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


class BadRequest(ValueError):
    pass


def _text(content, where):
    """A message's content: a string, null, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadRequest(f"{where} content must be a string or a list of text parts")


def parse_tools(tools, tool_choice):
    """(tools, choice) checked: choice is "auto", "none", "required" or the name of the function to call."""
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be a list of {'type': 'function', 'function': {...}}")
    names = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not _NAME.match(fn["name"]):
            raise BadRequest(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': 1-64 of a-z A-Z 0-9 _ -"
                             f", 'description': string, 'parameters': JSON schema object}}}}")
        if not isinstance(fn.get("description", ""), str) or not isinstance(fn.get("parameters", {}), dict):
            raise BadRequest(f"tools[{i}].function: 'description' must be a string, 'parameters' an object")
        names.append(fn["name"])
    if len(set(names)) != len(names):
        raise BadRequest("tools: function names must be unique")
    choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
    if isinstance(choice, dict):
        name = choice.get("function", {}).get("name") if isinstance(choice.get("function"), dict) else None
        if choice.get("type") != "function" or name not in names:
            raise BadRequest(f"'tool_choice' names a function that is not in 'tools' (have: {names})")
        choice = name
    elif choice not in ("auto", "none", "required"):
        raise BadRequest("'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                         "{'name': ...}}")
    elif choice == "required" and not tools:
        raise BadRequest("'tool_choice' is 'required' but no 'tools' were given")
    return [{"type": "function", "function": t["function"]} for t in tools], choice


def parse_messages(messages):
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}] must be {{'role': one of {sorted(ROLES)}, 'content': string}}")
        m = {**m, "content": _text(m.get("content"), f"messages[{i}]")}
        if m["role"] in ("system", "user") and not m["content"].strip():
            raise BadRequest(f"messages[{i}] has empty content")
        if m["role"] == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise BadRequest(f"messages[{i}] (tool) needs the 'tool_call_id' of the call it answers")
        out.append({k: m[k] for k in ("role", "content", "tool_calls", "tool_call_id", "name", "reasoning_content")
                    if m.get(k) is not None})
    if out[-1]["role"] not in ("user", "tool"):
        raise BadRequest("the last message must come from the user (or be a tool result)")
    try:
        out, _ = normalize_chat(out, key="messages", complete=False)  # the order and the tool calls, as in training
    except BadLineError as e:
        raise BadRequest(str(e)) from None
    return out


def parse_request(body: bytes, max_tokens_cap: int) -> dict:
    """The validated request, or BadRequest naming what is wrong."""
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not valid JSON: {e}") from None
    if not isinstance(req, dict):
        raise BadRequest("body must be a JSON object")
    messages = parse_messages(req.get("messages"))
    tools, choice = parse_tools(req.get("tools"), req.get("tool_choice"))

    def number(name, default, lo, hi, kind=float):
        value = req.get(name, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise BadRequest(f"'{name}' must be a number in [{lo}, {hi}]")
        return kind(value)

    stop = req.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a string or a list of up to 4 non-empty strings")
    if not isinstance(req.get("stream", False), bool):
        raise BadRequest("'stream' must be true or false")
    kwargs = req.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise BadRequest("'chat_template_kwargs' must be an object")
    thinking = kwargs.get("enable_thinking", req.get("open_thinking"))  # vLLM's switch, or MiniMind's
    if thinking is not None and not isinstance(thinking, bool):
        raise BadRequest("'enable_thinking' / 'open_thinking' must be true or false")
    if req.get("max_completion_tokens") is not None:  # OpenAI's newer name
        req["max_tokens"] = req["max_completion_tokens"]
    return {"messages": messages, "tools": tools, "tool_choice": choice, "thinking": thinking,
            "temperature": number("temperature", 0.7, 0.0, 2.0), "top_p": number("top_p", 1.0, 0.0, 1.0),
            "max_tokens": number("max_tokens", min(512, max_tokens_cap), 1, max_tokens_cap, int),
            "stream": req.get("stream", False), "stop": stop, "model": req.get("model")}


def reply_kwargs(req) -> dict:
    """Engine.stream_reply's arguments for a request. tool_choice "none": no tools in the prompt and calls stay text;
    "required" or a named function: the reply is forced to open a call (of that function), thinking off."""
    choice, tools, thinking = req["tool_choice"], req["tools"], req["thinking"]
    prefix = ""
    if choice == "required":
        prefix = '<tool_call>\n{"name": "'
    elif choice not in ("auto", "none"):
        prefix = '<tool_call>\n{"name": "' + choice + '", "arguments": '
    if prefix and thinking:
        thinking = False
    return dict(tools=tools if choice != "none" else None, thinking=thinking, prefix=prefix, stop=req["stop"],
                sampling=Sampling(max_new_tokens=req["max_tokens"], temperature=req["temperature"],
                                  top_p=req["top_p"] if req["temperature"] > 0 else 1.0))


class Generator:
    """One request at a time on the engine (a lock around each reply), so caches never mix."""

    def __init__(self, engine):
        self.engine = engine
        self.lock = threading.Lock()

    def complete(self, req):
        with self.lock:
            return self.engine.reply(req["messages"], **reply_kwargs(req))

    def stream(self, req):
        """Yields the reply's (field, value) events, then ("done", Reply); ("error", message) if it failed. The reply
        runs in a worker thread that holds the lock; a client that goes away stops it at the next token."""
        events, cancelled = queue.Queue(), threading.Event()

        def work():
            with self.lock:
                gen = self.engine.stream_reply(req["messages"], **reply_kwargs(req))
                try:
                    while not cancelled.is_set():
                        try:
                            events.put(next(gen))
                        except StopIteration as done:
                            events.put(("done", done.value))
                            return
                    gen.close()
                except Exception as e:  # a failure is reported to the client, never a dead server
                    events.put(("error", f"{type(e).__name__}: {e}"))

        threading.Thread(target=work, daemon=True).start()
        try:
            while True:
                event = events.get(timeout=600)
                yield event
                if event[0] in ("done", "error"):
                    return
        finally:
            cancelled.set()


def response_message(reply) -> dict:
    message = {"role": "assistant", "content": reply.content if reply.content or not reply.tool_calls else None}
    if reply.reasoning is not None:
        message["reasoning_content"] = reply.reasoning
    if reply.tool_calls:
        message["tool_calls"] = reply.tool_calls
    return message


def create_app(model, tokenizer, model_name="microlm", max_tokens_cap=2048):
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    engine = model if isinstance(model, Engine) else Engine(model, tokenizer)
    max_tokens_cap = min(max_tokens_cap, engine.context // 2)  # the other half at least stays for the prompt
    gen = Generator(engine)
    app = FastAPI(title="LLM_implementation chat")
    app.state.generator = gen

    def error(message, status=400):
        kind = "invalid_request_error" if status == 400 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "LLM_implementation"}]}

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.read_text(encoding="utf-8")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            req = parse_request(await request.body(), max_tokens_cap)
        except BadRequest as e:
            return error(str(e))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not req["stream"]:
            import anyio

            try:
                reply = await anyio.to_thread.run_sync(gen.complete, req)
            except Exception as e:  # reported, never a dead server
                return error(f"generation failed: {type(e).__name__}: {e}", 500)
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": response_message(reply),
                                 "finish_reason": reply.finish_reason}],
                    "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                              "total_tokens": reply.prompt_tokens + reply.completion_tokens}}

        def events():
            def chunk(delta, finish=None):
                return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                              "model": model_name, "choices": [{"index": 0, "delta": delta,
                                                                                "finish_reason": finish}]},
                                             ensure_ascii=False) + "\n\n"

            yield chunk({"role": "assistant", "content": ""})
            n_calls = 0
            for field, value in gen.stream(req):
                if field == "tool_call":  # as OpenAI streams a call: id and name first, then the arguments
                    head = {"id": value["id"], "type": "function",
                            "function": {"name": value["function"]["name"], "arguments": ""}}
                    yield chunk({"tool_calls": [{"index": n_calls, **head}]})
                    yield chunk({"tool_calls": [{"index": n_calls,
                                                 "function": {"arguments": value["function"]["arguments"]}}]})
                    n_calls += 1
                elif field == "done":
                    yield chunk({}, value.finish_reason)
                elif field == "error":
                    yield "data: " + json.dumps({"error": {"message": f"generation failed: {value}",
                                                           "type": "server_error"}}) + "\n\n"
                elif value:
                    yield chunk({field: value})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@contextlib.contextmanager
def serve_in_background(app, host="127.0.0.1", port=0):
    """Run app with uvicorn in a daemon thread (port 0: a free one) and yield its base URL; stop it on exit."""
    import uvicorn

    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(parser)  # the same --stage/--model_path/--adapter/--compile as the chat script
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1: this machine only")
    parser.add_argument("--port", type=int, default=8998)
    parser.add_argument("--max_tokens_cap", type=int, default=2048, help="the most tokens one request may ask for")
    parser.add_argument("--model_name", default="microlm", help="the id /v1/models reports")
    return parser


def main(argv=None):
    import uvicorn

    args = build_parser().parse_args(argv)
    model, tokenizer, path = load(args)  # same loading rules and errors as the chat script
    engine = Engine(model, tokenizer, compile=args.compile)
    print(f"serving {path} as '{args.model_name}' on http://{args.host}:{args.port}")
    uvicorn.run(create_app(engine, tokenizer, args.model_name, args.max_tokens_cap), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
