"""Every entry point's flags and defaults, read from its own parser: writes docs/flags.md (a test keeps it current).

    python scripts/flags_doc.py            # rewrite docs/flags.md
    python scripts/flags_doc.py --check    # exit 1 when docs/flags.md differs from the parsers
"""

import argparse
import contextlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from unittest import mock

from common.cli import HelpFormatter

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "flags.md"
# how a user calls it -> the module that parses its flags (a file path for the top-level scripts)
ENTRY_POINTS = {
    "1-pretrain.py": "1-pretrain.py", "2-sft.py": "2-sft.py", "3-KD.py": "3-KD.py", "4-RLHF.py": "4-RLHF.py",
    "5-LoRA.py": "5-LoRA.py", "6-reason.py": "6-reason.py", "eval_model.py": "eval_model.py",
    "data_process.py": "data_process.py", "python -m demo": "demo.run", "python -m demo.curriculum": "demo.curriculum",
    "python -m demo.samples": "demo.samples",
    **{f"scripts/{name}.py": f"scripts.{name}" for name in (
        "serve_openai_api", "convert_model", "compare_gguf", "eval_bench", "eval_tools", "bench", "bench_data", "bench_quality",
        "bench_stages", "train_tokenizer", "web_chat_screenshot", "mutation_check", "flags_doc", "plan_memory",
        "bench_memory", "bench_rollout")},
}
PYTHON = "%d.%d" % sys.version_info[:2]  # argparse lays help out a little differently across versions
WIDTH = "120"  # argparse wraps to $COLUMNS: fixed, so the page is the same on every machine


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


def _load(module: str):
    if module.endswith(".py"):
        spec = importlib.util.spec_from_file_location(module[:-3].replace("-", "_"), ROOT / module)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return importlib.import_module(module)


def parser_of(entry: str) -> argparse.ArgumentParser:
    """The parser `entry` builds, caught at its parse_args call: every entry point parses before doing anything."""
    def caught(self, *args, **kwargs):
        raise _Parsed(self)

    prog = entry.split()[-1] if entry.startswith("python -m") else entry
    with mock.patch.object(argparse.ArgumentParser, "parse_args", caught), \
            mock.patch.object(argparse.ArgumentParser, "parse_known_args", caught), \
            mock.patch.object(sys, "argv", [prog]), mock.patch.dict(os.environ, {"COLUMNS": WIDTH}):
        try:
            _load(ENTRY_POINTS[entry]).main()
        except _Parsed as parsed:
            return parsed.parser
    raise RuntimeError(f"{entry}: main() returned without parsing its arguments")


def subparsers(parser) -> dict:
    """{command: parser} of a parser with sub-commands (data_process.py download / convert / ...), else {}."""
    return next((dict(a.choices) for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def flags(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def help_text(parser) -> str:
    with mock.patch.dict(os.environ, {"COLUMNS": WIDTH}):
        assert parser.formatter_class is HelpFormatter, f"{parser.prog}: use common.cli.HelpFormatter"
        return parser.format_help()


def render() -> str:
    parts = ["# Flags of every entry point / 所有入口的参数\n",
             "Generated from the parsers by `python scripts/flags_doc.py`; do not edit by hand "
             "(`tests/test_docs.py` fails when this page is stale). Every `--help` prints the same text "
             f"(argparse's layout of Python {PYTHON}).\n",
             "由 `python scripts/flags_doc.py` 从各脚本的参数解析器生成，请勿手改；每个脚本的 `--help` 输出相同内容。\n"]
    parts += [f"- [`{e}`](#{_anchor(e)})" for e in ENTRY_POINTS]
    for entry in ENTRY_POINTS:
        parser = parser_of(entry)
        parts += [f"\n## {entry}\n", "```text", help_text(parser).rstrip(), "```"]
        for command, sub in subparsers(parser).items():
            parts += [f"\n### {entry} {command}\n", "```text", help_text(sub).rstrip(), "```"]
    return "\n".join(parts) + "\n"


def _anchor(title: str) -> str:
    # GitHub's heading anchors: lower case, spaces to '-', punctuation other than '-' and '_' dropped
    return "".join(c for c in title.lower().replace(" ", "-") if c.isalnum() or c in "-_")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when docs/flags.md is stale")
    parser.add_argument("--out", default=str(OUT), help="where the page goes")
    args = parser.parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # an entry point that prints while importing does not pollute
        text = render()
    out = Path(args.out)
    if args.check:
        if not out.exists() or out.read_text(encoding="utf-8") != text:
            sys.exit(f"{out} is stale: run python scripts/flags_doc.py")
        return text
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} ({len(ENTRY_POINTS)} entry points)")
    return text


if __name__ == "__main__":
    main()
