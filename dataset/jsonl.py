"""Lazy, validated access to jsonl files: index line offsets once, parse a line only when it is read.

A 1.6 GB pretraining file is never held in memory: the index keeps an int64 offset and size per good line. Lines that are
not valid JSON or fail the stage's schema are reported with file:line and skipped, or stop the run under strict.
"""

import hashlib
import json
import logging
import os

import numpy as np

log = logging.getLogger(__name__)
MAX_REPORTED = 10


def read_jsonl(path) -> list:
    """Every row of a small jsonl file (held-out sets, evaluation files), blank lines skipped."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows) -> None:
    """Write rows as UTF-8 jsonl (ensure_ascii off: Chinese stays readable)."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


class BadLineError(ValueError):
    pass


_WARNED: dict = {}


def warn_row(kind: str, where: str, message: str) -> None:
    """A row-level warning with its file:line, the first MAX_REPORTED of each kind in this process; the run's summary
    counts them all."""
    n = _WARNED[kind] = _WARNED.get(kind, 0) + 1
    if n <= MAX_REPORTED:
        log.warning("%s: %s", where, message)
    elif n == MAX_REPORTED + 1:
        log.warning("(further rows of this kind are counted, not listed: %s)", kind)


def check_text(obj) -> None:
    """Schema of pretraining lines: {"text": non-empty string}."""
    if not isinstance(obj, dict) or "text" not in obj:
        raise BadLineError('missing key "text"')
    if not isinstance(obj["text"], str) or not obj["text"].strip():
        raise BadLineError('"text" is not a non-empty string')


INDEX_VERSION = 1


def _rank():
    """This process's rank under torch.distributed, or None when it is not initialised."""
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None


def index_key(path, check) -> dict | None:
    """What a cached index is valid for: the file's size, mtime and ends, and the check function's name (stages check
    differently); None where the check has no stable name (a lambda, a closure), so nothing is cached."""
    name = "none" if check is None else f"{getattr(check, '__module__', '')}.{getattr(check, '__qualname__', '')}"
    if "<" in name or name.endswith("."):
        return None
    st = os.stat(path)
    # file times tick in milliseconds: a same-size rewrite within one tick keeps the mtime, so the two ends of the
    # file are hashed too (cheap at any size)
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        f.seek(max(st.st_size - (1 << 16), 0))
        ends = hashlib.sha1(head + f.read()).hexdigest()
    return {"version": INDEX_VERSION, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ends_sha1": ends,
            "check": name.rsplit(".", 1)[-1] if check is not None else "none", "check_full": name}


class JsonlFile:
    """Index of the good lines of a jsonl file; `[i]` parses the i-th good line from disk.

    The index (offsets, sizes, line numbers, the bad lines' reasons) is cached beside the file as
    `<file>.<check>.index.npz`, keyed by the file's size and mtime and the check: a 14 GB file is parsed once, by rank
    0, and every later run and every other rank reads the index instead."""

    def __init__(self, path, check=None, strict: bool = False, verbose: bool = True, cache: bool = True):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(
                f"data file not found: {self.path}. MiniMind's files: `python data_process.py download --list`; "
                f"`python data_process.py download <stage>` fetches a stage's file into dataset/")
        key = index_key(self.path, check) if cache else None
        self.index_path = f"{self.path}.{key['check']}.index.npz" if key else None
        self.from_cache = False
        rank0 = _rank() in (None, 0)
        if key and rank0:
            self.from_cache = self._load_index(key)
        if not self.from_cache and (rank0 or not key):
            self._build_index(check, strict, verbose)
            if key:
                self._save_index(key)
        if key and _rank() is not None:
            import torch.distributed as dist

            dist.barrier()  # the other ranks read rank 0's index instead of parsing every line again
        if key and not rank0:
            self.from_cache = self._load_index(key)
            if not self.from_cache:  # rank 0 could not write it (a read-only folder): parse here too
                self._build_index(check, strict, verbose)
        if self.from_cache:
            if strict and self.bad_lines:
                raise BadLineError(f"bad line (--strict): {self.bad_lines[0]}")
            for reason in self.bad_lines[:MAX_REPORTED] if verbose else []:
                log.warning("skipping bad line %s", reason)
        if verbose and self.bad_lines:
            log.warning("%s: skipped %d bad line(s) of %d", self.path, len(self.bad_lines),
                        len(self.offsets) + len(self.bad_lines))
        if len(self.offsets) == 0:
            raise BadLineError(f"{self.path} has no usable lines ({len(self.bad_lines)} bad)")
        self._file, self._pid = None, None

    def _build_index(self, check, strict, verbose):
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

    def _load_index(self, key) -> bool:
        try:
            with np.load(self.index_path, allow_pickle=False) as z:
                if json.loads(str(z["key"])) != key:
                    return False  # the file changed since (size or mtime), or the format did
                self.offsets, self.sizes, self.linenos = z["offsets"], z["sizes"], z["linenos"]
                self.bad_lines = [str(b) for b in z["bad_lines"]]
            return True
        except (OSError, KeyError, ValueError):
            return False

    def _save_index(self, key):
        tmp = f"{self.index_path}.{os.getpid()}.tmp.npz"
        try:
            np.savez(tmp, key=json.dumps(key), offsets=self.offsets, sizes=self.sizes, linenos=self.linenos,
                     bad_lines=np.asarray(self.bad_lines, dtype=str))
            os.replace(tmp, self.index_path)  # never a half-written index under the real name
        except OSError as e:
            log.info("not caching the index of %s (%s)", self.path, e)
            if os.path.exists(tmp):
                os.remove(tmp)

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
