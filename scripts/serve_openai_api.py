"""OpenAI-compatible chat server for any stage's checkpoint, with a web chat page at /.

    python scripts/serve_openai_api.py                          # out/sft on http://127.0.0.1:8998
    python scripts/serve_openai_api.py --stage reason --port 8000
    python scripts/serve_openai_api.py --stage lora --host 0.0.0.0   # listen beyond this machine (no auth!)

Endpoints: POST /v1/chat/completions (stream or not; temperature, top_p, max_tokens, stream, stop), GET /v1/models,
GET /health, GET / (the web chat). A reasoning model's <think> part comes back as `reasoning_content`. Requests are
validated (400 with a JSON error), max_tokens and the prompt length are capped, and generation runs one request at a
time, so concurrent requests are all answered and never share a cache.

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8998/v1", api_key="none")
    client.chat.completions.create(model="microlm", messages=[{"role": "user", "content": "你好"}])
"""

import argparse
import contextlib
import json
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eval_model  # noqa: E402  (the chat script: one set of model-loading arguments and rules)

ROLES = {"system", "user", "assistant"}
PAGE = Path(__file__).with_name("web_chat.html")


class BadRequest(ValueError):
    pass


def parse_request(body: bytes, max_tokens_cap: int) -> dict:
    """The validated request, or BadRequest naming what is wrong."""
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not valid JSON: {e}") from None
    if not isinstance(req, dict):
        raise BadRequest("body must be a JSON object")
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadRequest(f"messages[{i}] must be {{'role': one of {sorted(ROLES)}, 'content': string}}")
        if not m["content"].strip():
            raise BadRequest(f"messages[{i}] has empty content")
    if messages[-1]["role"] != "user":
        raise BadRequest("the last message must come from the user")

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
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "temperature": number("temperature", 0.7, 0.0, 2.0), "top_p": number("top_p", 1.0, 0.0, 1.0),
            "max_tokens": number("max_tokens", min(512, max_tokens_cap), 1, max_tokens_cap, int),
            "stream": req.get("stream", False), "stop": stop, "model": req.get("model")}


def split_reasoning(text: str) -> tuple:
    """(reasoning_content, content): the <think> part apart from the rest; the <answer> tags are dropped."""
    reasoning = None
    if "<think>" in text:
        before, _, rest = text.partition("<think>")
        reasoning, _, after = rest.partition("</think>")
        text, reasoning = before + after, reasoning.strip()
    content = text.replace("<answer>", "").replace("</answer>", "").strip()
    return reasoning, content


def cut_at_stop(text: str, stop: list) -> tuple:
    """(text before the first stop string, whether one was found)."""
    cuts = [text.find(s) for s in stop if s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


class ThinkRouter:
    """Streamed text to (field, text) pieces: inside <think>...</think> to reasoning_content, the rest to content with
    the <answer> tags dropped. A tail that may be the start of a tag split across tokens waits for the next text."""

    def __init__(self):
        self.thinking, self.pending = False, ""

    def _field(self):
        return "reasoning_content" if self.thinking else "content"

    def feed(self, text: str) -> list:
        self.pending += text
        out = []
        while self.pending:
            tags = ["</think>"] if self.thinking else ["<think>", "<answer>", "</answer>"]
            hits = [(self.pending.find(t), t) for t in tags if t in self.pending]
            if hits:
                i, tag = min(hits)
                if i:
                    out.append((self._field(), self.pending[:i]))
                self.pending = self.pending[i + len(tag):]
                self.thinking ^= tag in ("<think>", "</think>")
                continue
            hold = max((k for t in tags for k in range(1, len(t)) if self.pending.endswith(t[:k])), default=0)
            cut = len(self.pending) - hold
            if cut:
                out.append((self._field(), self.pending[:cut]))
            self.pending = self.pending[cut:]
            break
        return out

    def flush(self) -> list:
        out = [(self._field(), self.pending)] if self.pending else []
        self.pending = ""
        return out


class _Flag(StoppingCriteria):
    def __init__(self):
        self.stop = False

    def __call__(self, input_ids, scores, **kwargs):
        return self.stop


class Generator:
    """One request at a time on the model (a lock around generate), so caches never mix."""

    def __init__(self, model, tokenizer, context: int):
        self.model, self.tokenizer, self.context = model, tokenizer, context
        self.lock = threading.Lock()

    def prompt_ids(self, messages, max_tokens: int):
        """The chat prompt, cut from the left (the oldest turns go first) to leave room for max_tokens."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][-(self.context - max_tokens):]
        return torch.tensor([ids], device=self.model.device)

    def _kwargs(self, req, ids):
        sampling = dict(do_sample=True, temperature=req["temperature"], top_p=req["top_p"], top_k=0) \
            if req["temperature"] > 0 else dict(do_sample=False)
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=req["max_tokens"],
                    eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id, **sampling,
                    **eval_model.decode_cache(self.model, ids.size(1) + req["max_tokens"]))

    def complete(self, req) -> dict:
        ids = self.prompt_ids(req["messages"], req["max_tokens"])
        with self.lock, torch.no_grad():
            out = self.model.generate(**self._kwargs(req, ids))
        new = out[0, ids.size(1):].tolist()
        eos = self.tokenizer.eos_token_id
        finished = eos in new
        new = new[:new.index(eos)] if finished else new
        text, stopped = cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=False), req["stop"])
        return {"text": text, "finish_reason": "stop" if finished or stopped else "length",
                "prompt_tokens": ids.size(1), "completion_tokens": len(new)}

    def stream(self, req):
        """Yields (text delta, finish_reason or None); stop strings are held back until they cannot match."""
        ids = self.prompt_ids(req["messages"], req["max_tokens"])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=False, timeout=600)
        flag = _Flag()
        kwargs = self._kwargs(req, ids) | dict(streamer=streamer, stopping_criteria=StoppingCriteriaList([flag]))
        self.lock.acquire()

        def work():
            try:
                with torch.no_grad():
                    self.model.generate(**kwargs)
            finally:
                self.lock.release()

        threading.Thread(target=work, daemon=True).start()
        text, sent, n_tokens, hold = "", 0, 0, max((len(s) for s in req["stop"]), default=1) - 1
        eos = self.tokenizer.eos_token
        finish = "length"
        for piece in streamer:
            n_tokens += 1
            if eos in piece:
                text += piece.split(eos)[0]
                finish = "stop"
                break
            text += piece
            cut, stopped = cut_at_stop(text, req["stop"])
            if stopped:
                text, finish = cut, "stop"
                break
            if len(text) - hold > sent:
                yield text[sent:len(text) - hold], None
                sent = len(text) - hold
        else:
            streamer = ()  # generation ended by itself
        flag.stop = True
        for _ in streamer:  # stopped early: let generate finish (at its next step) and release the lock
            pass
        if len(text) > sent:
            yield text[sent:], None
        yield "", finish


def create_app(model, tokenizer, model_name="microlm", max_tokens_cap=2048):
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    context = getattr(model.config, "max_position_embeddings", 2048)
    max_tokens_cap = min(max_tokens_cap, context // 2)  # the other half at least stays for the prompt
    gen = Generator(model, tokenizer, context)
    app = FastAPI(title="LLM_implementation chat")

    def error(message, status=400):
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)

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

            out = await anyio.to_thread.run_sync(gen.complete, req)
            reasoning, content = split_reasoning(out["text"])
            message = {"role": "assistant", "content": content}
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": message, "finish_reason": out["finish_reason"]}],
                    "usage": {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                              "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}}

        def events():
            def chunk(delta, finish=None):
                return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                              "model": model_name, "choices": [{"index": 0, "delta": delta,
                                                                                "finish_reason": finish}]},
                                             ensure_ascii=False) + "\n\n"

            yield chunk({"role": "assistant", "content": ""})
            router = ThinkRouter()
            for text, finish in gen.stream(req):
                for field, piece in router.feed(text):
                    yield chunk({field: piece})
                if finish:
                    for field, piece in router.flush():
                        yield chunk({field: piece})
                    yield chunk({}, finish)
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    eval_model.add_model_args(parser)  # the same --stage/--model_path/--adapter/... as the chat script
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1: this machine only")
    parser.add_argument("--port", type=int, default=8998)
    parser.add_argument("--max_tokens_cap", type=int, default=2048, help="the most tokens one request may ask for")
    parser.add_argument("--model_name", default="microlm", help="the id /v1/models reports")
    return parser


def main(argv=None):
    import uvicorn

    args = build_parser().parse_args(argv)
    model, tokenizer, path = eval_model.load(args)  # same loading rules and errors as the chat script
    print(f"serving {path} as '{args.model_name}' on http://{args.host}:{args.port}")
    uvicorn.run(create_app(model, tokenizer, args.model_name, args.max_tokens_cap), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
