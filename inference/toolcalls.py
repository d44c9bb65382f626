"""Hermes/Qwen-style tool calls in generated text: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`,
the form our chat template writes and vLLM's `hermes` parser, llama.cpp and ollama read."""

import json
import re

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def parse_tool_calls(text: str):
    """(content, calls, errors): the text outside the call blocks (stripped), the well-formed calls as OpenAI-style
    {"type": "function", "function": {"name", "arguments": dict}}, and a message per block that is not one. An
    opened but never closed block is an error too, and its text stays in the content."""
    calls, errors = [], []
    for block in _CALL.findall(text):
        try:
            obj = json.loads(block)
        except ValueError as e:
            errors.append(f"tool call is not valid JSON ({e}): {block[:200]!r}")
            continue
        arguments = obj.get("arguments", {}) if isinstance(obj, dict) else None
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                arguments = None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(arguments, dict):
            errors.append(f'tool call is not {{"name": str, "arguments": object}}: {block[:200]!r}')
            continue
        calls.append({"type": "function", "function": {"name": obj["name"], "arguments": arguments}})
    content = _CALL.sub("", text)
    if "<tool_call>" in content:
        errors.append("a <tool_call> block is not closed")
    return content.strip(), calls, errors
