"""Built-in tools a model may call, each a plain function with an OpenAI-style JSON schema. A tool never raises into
the chat: run_tool turns bad arguments, unknown names and exceptions into an error message for the model."""

import ast
import datetime
import inspect
import operator

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPONENT, MAX_DIGITS = 100, 1000  # 9**9**9 would hang the process


def calculator(expression: str) -> str:
    """Evaluate arithmetic: + - * / // % ** ( ).

    expression: e.g. 37+25
    """
    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
                raise ValueError(f"exponent {right} is too large")
            result = _BINARY[type(node.op)](left, right)
            if isinstance(result, int) and len(str(abs(result))) > MAX_DIGITS:
                raise ValueError("result is too large")
            return result
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.unparse(node)!r}")

    tree = ast.parse(str(expression).strip(), mode="eval")  # parsed, never eval()'d
    result = value(tree.body)
    if isinstance(result, float) and result.is_integer():
        result = int(result)
    return str(result if not isinstance(result, float) else round(result, 10))


def current_time(timezone: str = "UTC") -> str:
    """The current date and time.

    timezone: "UTC" or an offset such as "+08:00"
    """
    if timezone.upper() in ("UTC", "Z", ""):
        tz = datetime.timezone.utc
    else:
        sign = -1 if timezone.startswith("-") else 1
        hours, _, minutes = timezone.lstrip("+-").partition(":")
        tz = datetime.timezone(sign * datetime.timedelta(hours=int(hours), minutes=int(minutes or 0)))
    return datetime.datetime.now(tz).isoformat(timespec="seconds")


BUILTIN_TOOLS = {"calculator": calculator, "current_time": current_time}


def tool_schema(fn) -> dict:
    """OpenAI-style schema from a function's signature and docstring (first line: description; `name: text` lines:
    parameter descriptions)."""
    doc = inspect.getdoc(fn) or ""
    lines = doc.splitlines()
    described = {}
    for line in lines[1:]:
        name, sep, text = line.strip().partition(":")
        if sep and name.isidentifier():
            described[name] = text.strip()
    types = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}
    properties, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        prop = {"type": types.get(p.annotation, "string")}
        if p.name in described:
            prop["description"] = described[p.name]
        properties[p.name] = prop
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
    return {"type": "function", "function": {"name": fn.__name__, "description": lines[0] if lines else "",
                                             "parameters": {"type": "object", "properties": properties,
                                                            "required": required}}}


def run_tool(name: str, arguments: dict, tools=None) -> str:
    """The tool's result as text, or "error: ..." for an unknown tool, bad arguments or an exception."""
    tools = BUILTIN_TOOLS if tools is None else tools
    fn = tools.get(name)
    if fn is None:
        return f"error: unknown tool {name!r} (available: {', '.join(sorted(tools))})"
    try:
        inspect.signature(fn).bind(**arguments)
    except TypeError as e:
        return f"error: bad arguments for {name}: {e}"
    try:
        return str(fn(**arguments))
    except Exception as e:  # the model gets the message; the chat goes on
        return f"error: {name} failed: {type(e).__name__}: {e}"
