"""Lazy, validated access to jsonl files: index line offsets once, parse a line only when it is read.

A 1.6 GB pretraining file is never held in memory: the index keeps an int64 offset and size per good line. Lines that are
not valid JSON or fail the stage's schema are reported with file:line and skipped, or stop the run under strict.
"""

import json
import logging
import os

import numpy as np

log = logging.getLogger(__name__)
MAX_REPORTED = 10


class BadLineError(ValueError):
    pass


def check_text(obj) -> None:
    """Schema of pretraining lines: {"text": non-empty string}."""
    if not isinstance(obj, dict) or "text" not in obj:
        raise BadLineError('missing key "text"')
    if not isinstance(obj["text"], str) or not obj["text"].strip():
        raise BadLineError('"text" is not a non-empty string')


class JsonlFile:
    """Index of the good lines of a jsonl file; `[i]` parses the i-th good line from disk."""

    def __init__(self, path, check=None, strict: bool = False, verbose: bool = True):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(
                f"data file not found: {self.path}. MiniMind's files: `python data_process.py download --list`; "
                f"`python data_process.py download <stage>` fetches a stage's file into dataset/")
        offsets, sizes, linenos, self.bad_lines = [], [], [], []
        with open(self.path, "rb") as f:
            offset = 0
            for lineno, raw in enumerate(f, start=1):
                if raw.strip():
                    try:
                        obj = json.loads(raw)
                        if check is not None:
                            check(obj)
                        offsets.append(offset)
                        sizes.append(len(raw))
                        linenos.append(lineno)
                    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError and BadLineError are ValueErrors
                        reason = f"{self.path}:{lineno}: {e}"
                        if strict:
                            raise BadLineError(f"bad line (--strict): {reason}") from None
                        self.bad_lines.append(reason)
                        if verbose and len(self.bad_lines) <= MAX_REPORTED:
                            log.warning("skipping bad line %s", reason)
                offset += len(raw)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)  # bytes per good line: a cheap proxy for its token count
        self.linenos = np.asarray(linenos, dtype=np.int64)
        if verbose and self.bad_lines:
            log.warning("%s: skipped %d bad line(s) of %d", self.path, len(self.bad_lines),
                        len(self.offsets) + len(self.bad_lines))
        if len(self.offsets) == 0:
            raise BadLineError(f"{self.path} has no usable lines ({len(self.bad_lines)} bad)")
        self._file, self._pid = None, None

    def __len__(self):
        return len(self.offsets)

    def _read(self, offset: int, size: int) -> bytes:
        # Opened lazily, and again in each process: a forked DataLoader worker inherits the parent's open file, whose
        # offset the OS shares between processes, so seek + read in two workers at once returned truncated rows or
        # another line's row. Positional reads (pread) use no shared offset at all.
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = open(self.path, "rb"), os.getpid()
        if hasattr(os, "pread"):
            return os.pread(self._file.fileno(), size, offset)
        self._file.seek(offset)
        return self._file.read(size)

    def __getitem__(self, i):
        return json.loads(self._read(int(self.offsets[i]), int(self.sizes[i])))

    def where(self, i) -> str:
        """file:line of the i-th good line, for messages about a row."""
        return f"{self.path}:{int(self.linenos[i])}"

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_pid": None}

    def __iter__(self):
        return (self[i] for i in range(len(self)))
