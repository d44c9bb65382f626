"""Built-in tools a model may call, each a plain function with an OpenAI-style JSON schema. A tool never raises into
the chat: run_tool turns bad arguments, unknown names and exceptions into an error message for the model."""

import ast
import datetime
import importlib
import importlib.util
import inspect
import json
import operator
import threading
from pathlib import Path

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


# factor to the base unit of each dimension; temperatures are affine and handled apart
_UNITS = {"m": 1, "km": 1000, "cm": 0.01, "mm": 0.001, "mi": 1609.344, "ft": 0.3048, "in": 0.0254, "yd": 0.9144,
          "kg": 1, "g": 0.001, "mg": 1e-6, "lb": 0.45359237, "oz": 0.028349523125, "jin": 0.5,
          "l": 1, "ml": 0.001, "gal": 3.785411784,
          "s": 1, "min": 60, "h": 3600, "day": 86400}
_DIMENSION = {**dict.fromkeys(["m", "km", "cm", "mm", "mi", "ft", "in", "yd"], "length"),
              **dict.fromkeys(["kg", "g", "mg", "lb", "oz", "jin"], "mass"),
              **dict.fromkeys(["l", "ml", "gal"], "volume"), **dict.fromkeys(["s", "min", "h", "day"], "time")}
_TO_KELVIN = {"c": (1, 273.15), "k": (1, 0), "f": (5 / 9, 273.15 - 32 * 5 / 9)}


def convert_units(value: float, from_unit: str, to_unit: str) -> str:
    """Convert a quantity between units of length, mass, volume, time or temperature.

    value: the number to convert
    from_unit: e.g. km, mi, kg, lb, jin, l, gal, h, C, F, K
    to_unit: the unit wanted
    """
    a, b = str(from_unit).strip().lower(), str(to_unit).strip().lower()
    value = float(value)
    if a in _TO_KELVIN and b in _TO_KELVIN:
        (fa, oa), (fb, ob) = _TO_KELVIN[a], _TO_KELVIN[b]
        result = ((value * fa + oa) - ob) / fb
    elif a in _UNITS and b in _UNITS and _DIMENSION[a] == _DIMENSION[b]:
        result = value * _UNITS[a] / _UNITS[b]
    else:
        known = sorted(_UNITS) + ["C", "F", "K"]
        raise ValueError(f"cannot convert {from_unit!r} to {to_unit!r} (known units: {', '.join(known)})")
    result = round(result, 6)
    return f"{int(result) if result.is_integer() else result} {to_unit}"


BUILTIN_TOOLS = {"calculator": calculator, "current_time": current_time, "convert_units": convert_units}


def load_function(where: str, name: str, missing_file: str, origin: str):
    """The function `name` of a file (`where` ends in .py) or an importable module, for plug-ins named on a
    command line (tools here, rewards in dataset/rewards.py); a clear error naming `origin` otherwise."""
    if where.endswith(".py"):
        path = Path(where)
        if not path.exists():
            raise FileNotFoundError(f"{missing_file} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{where} has no function {name!r} {origin}")
    return fn


def scripted_tool(spec):
    """A data row's scripted tool (agent_rl's "tool_results", the demo's tool evaluation): "result" (whatever the
    arguments), or {"arguments": {...}, "result": ...}: only a call with exactly these arguments gets the result, any
    other an error (so a wrong argument cannot earn the answer)."""
    if not (isinstance(spec, dict) and "result" in spec):
        return lambda **_: str(spec)
    squash = lambda v: json.dumps(v, sort_keys=True, ensure_ascii=False).replace(" ", "")  # noqa: E731

    def tool(**arguments):
        if "arguments" in spec and squash(arguments) != squash(spec["arguments"]):
            return f"error: no result for {json.dumps(arguments, ensure_ascii=False)}"
        return str(spec["result"])
    return tool


def load_tools(spec: str) -> dict:
    """Tools named on a command line: "builtin" (all built-ins), built-in names, `file.py:function` or
    `module:function`, comma-separated -> {name: function}. A missing file or function names what is wrong."""
    tools = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part == "builtin":
            tools.update(BUILTIN_TOOLS)
            continue
        if part in BUILTIN_TOOLS:
            tools[part] = BUILTIN_TOOLS[part]
            continue
        where, sep, name = part.rpartition(":")
        if not sep or not where or not name:
            raise ValueError(f"unknown tool {part!r}: use 'builtin', one of {sorted(BUILTIN_TOOLS)}, "
                             f"'file.py:function' or 'module:function'")
        fn = load_function(where, name, f"tool file {where} (from {part})", f"(from {part})")
        tools[fn.__name__] = fn
    return tools


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


def run_tool(name: str, arguments: dict, tools=None, timeout: float | None = None) -> str:
    """The tool's result as text, or "error: ..." for an unknown tool, bad arguments, an exception or a call that
    takes longer than `timeout` seconds (its thread is left to finish in the background: Python cannot kill it)."""
    tools = BUILTIN_TOOLS if tools is None else tools
    fn = tools.get(name)
    if fn is None:
        return f"error: unknown tool {name!r} (available: {', '.join(sorted(tools))})"
    if not isinstance(arguments, dict):
        return f"error: bad arguments for {name}: not a JSON object"
    try:
        inspect.signature(fn).bind(**arguments)
    except TypeError as e:
        return f"error: bad arguments for {name}: {e}"
    if timeout is None:
        return _call(name, fn, arguments)
    result = []
    worker = threading.Thread(target=lambda: result.append(_call(name, fn, arguments)), daemon=True)
    worker.start()
    worker.join(timeout)
    return result[0] if result else f"error: {name} timed out after {timeout:g} s"


def _call(name, fn, arguments) -> str:
    try:
        return str(fn(**arguments))
    except Exception as e:  # the model gets the message; the chat goes on
        return f"error: {name} failed: {type(e).__name__}: {e}"
