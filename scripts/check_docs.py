"""Docs that cannot rot: every command in the README and docs/ that calls one of our scripts uses only flags that
script's parser accepts, and every relative link and image resolves.

    python scripts/check_docs.py          # prints each problem as file:line, exit 1 if any
"""

import argparse
import re
import shlex
import sys
from pathlib import Path

from common.cli import HelpFormatter
from scripts.flags_doc import ENTRY_POINTS, flags, parser_of, subparsers

ROOT = Path(__file__).resolve().parents[1]
# what follows `python -m` -> the entry point
MODULES = {**{module: entry for entry, module in ENTRY_POINTS.items() if not module.endswith(".py")},
           "demo": "python -m demo"}
FENCE = re.compile(r"^(\s*)```")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|<img[^>]*\bsrc=\"([^\"]+)\"")
INLINE = re.compile(r"`([^`\n]+)`")


def doc_files(root: Path = ROOT) -> list[Path]:
    return sorted([root / "README.md", root / "README_en.md", *(root / "docs").rglob("*.md"),
                   *(root / "scripts").glob("*.sh")])


def _entry(token: str) -> str | None:
    """The entry point a command-line word names (a script path, or a module after -m), else None."""
    if token in MODULES:
        return MODULES[token]
    parts = Path(token).parts
    key = "/".join(parts[-2:]) if len(parts) > 1 and parts[-2] == "scripts" else parts[-1] if parts else ""
    return key if key in ENTRY_POINTS else None


def commands(path: Path):
    """(line number, shell words) of every call of one of our scripts: fenced shell blocks line by line (joining
    `\\` continuations), inline code spans in prose, and whole .sh files."""
    lines = path.read_text(encoding="utf-8").split("\n")
    in_code, lang = path.suffix == ".sh", ""
    pending, start = "", 0
    for n, line in enumerate(lines, 1):
        fence = FENCE.match(line)
        if fence and path.suffix != ".sh":
            in_code, lang = (not in_code), line.strip()[3:].strip()
            continue
        if in_code:
            if lang not in ("", "bash", "sh", "shell", "console"):
                continue
            if not pending:
                start = n
            pending += " " + line.rstrip().removesuffix("\\")
            if line.rstrip().endswith("\\"):
                continue
            texts, pending = [(start, pending)], ""
        else:
            texts = [(n, m.group(1)) for m in INLINE.finditer(line)]
        for at, text in texts:
            for part in re.split(r"&&|\|\||;|\|", text.split(" #")[0]):
                try:
                    words = shlex.split(part, comments=True)
                except ValueError:
                    continue
                for i, word in enumerate(words):
                    if i and words[i - 1] == "-m" or word.endswith(".py"):
                        entry = _entry(word)
                        if entry:
                            yield at, entry, words[i + 1:]
                            break


def _parser(entry: str, cache: dict):
    if entry not in cache:
        cache[entry] = parser_of(entry)
    return cache[entry]


def bad_flags(entry: str, args: list[str], cache: dict) -> list[str]:
    """The flags in args that entry's parser does not accept (with a sub-command's flags for data_process.py)."""
    parser = _parser(entry, cache)
    known = flags(parser)
    if entry == "python -m demo":  # it passes the flags it does not know on to every stage script
        known |= {f for e in ENTRY_POINTS if e[0].isdigit() for f in flags(_parser(e, cache))}
    subs = subparsers(parser)
    positional = [a for a in args if not a.startswith("-")]
    if subs and positional and positional[0] in subs:
        known = known | flags(subs[positional[0]])
    return [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in known]


def bad_links(path: Path) -> list[tuple[int, str]]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        for m in LINK.finditer(line):
            target = (m.group(1) or m.group(2)).split("#")[0]
            if not target or re.match(r"^[a-z]+:", target):  # anchors in the page, http(s), mailto
                continue
            if not (path.parent / target).exists():
                out.append((n, target))
    return out


def problems(files=None) -> list[str]:
    found, cache = [], {}
    for path in files or doc_files():
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        for n, target in bad_links(path):
            found.append(f"{rel}:{n}: link or image {target!r} does not exist")
        for n, entry, args in commands(path):
            for flag in bad_flags(entry, args, cache):
                found.append(f"{rel}:{n}: {entry} has no flag {flag}")
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("files", nargs="*", help="markdown or shell files (default: README*.md, docs/, scripts/*.sh)")
    args = parser.parse_args(argv)
    found = problems([Path(f).resolve() for f in args.files] or None)
    print("\n".join(found) or "docs: every link, image and flag checked")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
