"""A user's own corpus: a bounded, seeded random sample of a jsonl file of any size, with held-out rows."""

import heapq
import json
import random
from pathlib import Path

from .sources import HELD_OUT_EVERY, SEED


def row_text(row):
    """A jsonl row as plain text: its "text", or the contents of its "conversations" joined by newlines."""
    if isinstance(row, dict):
        if isinstance(row.get("text"), str):
            return row["text"]
        conv = row.get("conversations")
        if isinstance(conv, list):
            parts = [m.get("content") if isinstance(m, dict) else m for m in conv]
            return "\n".join(p for p in parts if isinstance(p, str) and p)
    return ""


def _offer(pool, key, index, text):
    """Keep `text` in the pool if its key is among the smallest that fit the pool's character budget."""
    heap, size, cutoff, budget = pool
    if key >= cutoff or len(text) > budget:
        return
    heapq.heappush(heap, (-key, index, text))
    size += len(text)
    while size > budget:
        neg_key, _, dropped = heapq.heappop(heap)
        size -= len(dropped)
        cutoff = min(cutoff, -neg_key)
    pool[:3] = heap, size, cutoff


def sample_jsonl(path, max_chars, seed=SEED, held_out_every=HELD_OUT_EVERY, progress=True):
    """Stream a jsonl file once; return (train_texts, held_out_texts, stats), never holding more than ~max_chars.

    Each row gets a seeded random key; the training sample is the rows of smallest key whose texts add up to at
    most max_chars (a heap evicts the largest key when the budget is exceeded, and rows with a key above an evicted
    one are skipped). Every held_out_every-th row is never trained on; a sample of those (max_chars /
    held_out_every characters, chosen the same way) is held out. Rows come back in file order."""
    rng = random.Random(f"{seed}-data")
    pools = {"train": [[], 0, float("inf"), max_chars], "held": [[], 0, float("inf"), max_chars // held_out_every]}
    rows = bad = empty = total_chars = 0
    path = Path(path)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"reading {path.name}")
    with open(path, "rb") as f:
        for index, line in enumerate(f):
            if bar is not None:
                bar.update(len(line))
            key = rng.random()  # drawn for every line, so a row's key depends only on its position
            if not line.strip():
                continue
            try:
                text = row_text(json.loads(line))
            except ValueError:
                bad += 1
                continue
            if not text.strip():
                empty += 1
                continue
            rows += 1
            total_chars += len(text)
            _offer(pools["held" if held_out_every and index % held_out_every == 0 else "train"], key, index, text)
    if bar is not None:
        bar.close()
    out = {name: [text for _, _, text in sorted(heap, key=lambda item: item[1])] for name, (heap, *_) in pools.items()}
    stats = {"rows": rows, "chars": total_chars, "bad_lines": bad, "empty_rows": empty,
             "train_rows": len(out["train"]), "train_chars": sum(map(len, out["train"])),
             "held_out_rows": len(out["held"]), "held_out_chars": sum(map(len, out["held"]))}
    return out["train"], out["held"], stats
