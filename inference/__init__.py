"""Running a trained model: tool-call parsing and built-in tools (the one inference core grows here; the model
package knows nothing of tools, files or HTTP)."""

from .toolcalls import parse_tool_calls
from .tools import BUILTIN_TOOLS, calculator, run_tool, tool_schema

__all__ = ["BUILTIN_TOOLS", "calculator", "parse_tool_calls", "run_tool", "tool_schema"]
