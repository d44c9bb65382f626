"""Running a trained model: the one inference core (engine.py: decoding, chat template, stream splitting, the tool
loop), loading a checkpoint (load.py), tool-call parsing and built-in tools. The model package knows nothing of
tools, files or HTTP; this package knows nothing of training or HTTP."""

from .engine import Engine, Reply, Sampling, StreamSplitter, TextStream, cut_at_stop, decode, generate, left_pad, \
    split_reasoning
from .toolcalls import parse_tool_calls
from .tools import BUILTIN_TOOLS, calculator, convert_units, current_time, load_tools, run_tool, tool_schema

__all__ = ["BUILTIN_TOOLS", "Engine", "Reply", "Sampling", "StreamSplitter", "TextStream", "calculator",
           "convert_units", "current_time", "cut_at_stop", "decode", "generate", "left_pad", "load_tools",
           "parse_tool_calls", "run_tool", "split_reasoning", "tool_schema"]
