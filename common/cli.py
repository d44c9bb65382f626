"""Command-line help shared by every entry point: the docstring as written, and every flag's default."""

import argparse
import copy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends `(default: X)` to every option that has a default, including
    options without a help string (argparse's ArgumentDefaultsHelpFormatter skips those), so `--help` is the one
    place a default can be read. Paths inside the repository are shown relative to it, the same on every machine."""

    def _format_action(self, action):
        if not action.help and _has_default(action):  # argparse prints no help column for these at all
            action = copy.copy(action)
            action.help = _default_text(action)
        return super()._format_action(action)

    def _get_help_string(self, action):
        help = action.help or ""
        if "%(default)" in help or "(default: " in help or not _has_default(action):
            return help
        return f"{help} {_default_text(action)}"


def _has_default(action) -> bool:
    return bool(action.option_strings) and action.default is not argparse.SUPPRESS and \
        not isinstance(action, (argparse._HelpAction, argparse._VersionAction))


def _default_text(action) -> str:
    default = action.default
    if isinstance(default, (str, Path)) and Path(default).is_absolute():
        try:
            default = Path(default).relative_to(ROOT)
        except ValueError:
            pass
    return f"(default: {default})".replace("%", "%%")
