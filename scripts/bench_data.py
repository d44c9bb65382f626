"""Data-side figures on generated SFT jsonl files: the peak memory of `data_process.py validate` and `stats` (it stays
flat as files grow), and the loader: the line index built (every line parsed) against read from its cache, and
chat rows rendered + tokenized per second by one process -- what one DataLoader worker delivers.

    python scripts/bench_data.py                  # 20 MB and 200 MB SFT files in a temporary folder
    python scripts/bench_data.py --sizes_mb 20 200 1000
    python scripts/bench_data.py --loader_only --json scripts/results/bench_data_loader.json

Each command runs in a fresh process that reports its own peak resident set size (ru_maxrss) at exit, so the
figures include the Python interpreter, torch/transformers imports and the tokenizer.
"""

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.cli import HelpFormatter

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import resource, sys, json
sys.argv = ["data_process.py", *json.loads(sys.argv[1])]
import runpy
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit:
    pass
print("PEAK_RSS_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)
"""


def make_sft_file(path: Path, size_mb: int, seed: int = 0) -> int:
    rng, written, rows = random.Random(seed), 0, 0
    words = ["数据", "模型", "训练", "the", "model", "learns", "每一步", "损失", "下降", "tokens"]
    with open(path, "w", encoding="utf-8") as f:
        while written < size_mb * 2**20:
            q = " ".join(rng.choices(words, k=rng.randint(5, 40)))
            a = " ".join(rng.choices(words, k=rng.randint(20, 300)))
            line = json.dumps({"conversations": [{"role": "user", "content": q},
                                                 {"role": "assistant", "content": a}]}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode())
            rows += 1
    return rows


def peak_rss(args) -> tuple:
    code = CHILD.format(root=str(ROOT), script=str(ROOT / "data_process.py"))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True)
    seconds = time.time() - t0
    line = [x for x in proc.stderr.splitlines() if x.startswith("PEAK_RSS_MB")]
    if not line:
        raise RuntimeError(proc.stderr[-2000:])
    return float(line[-1].split()[1]), seconds


def loader_figures(path: Path, n_rows: int = 2000, max_seq_len: int = 512) -> dict:
    """Index build vs cached index (seconds), then SFTDataset rows/s and tokens/s in this one process."""
    from transformers import AutoTokenizer

    from dataset import SFTDataset
    from dataset.chat import check_conversations
    from dataset.jsonl import JsonlFile
    from model import TOKENIZER_DIR

    t0 = time.perf_counter()
    built = JsonlFile(path, check_conversations, verbose=False)
    t1 = time.perf_counter()
    cached = JsonlFile(path, check_conversations, verbose=False)
    t2 = time.perf_counter()
    assert not built.from_cache and cached.from_cache
    data = SFTDataset(path, AutoTokenizer.from_pretrained(TOKENIZER_DIR), max_seq_len, verbose=False)
    n = min(n_rows, len(data))
    tokens, t3 = 0, time.perf_counter()
    for i in range(n):
        tokens += int(data[i]["input_ids"].numel())
    t4 = time.perf_counter()
    return {"rows": len(built), "index_build_s": round(t1 - t0, 3), "index_cached_s": round(t2 - t1, 4),
            "rows_per_s": round(n / (t4 - t3)), "tokens_per_s": round(tokens / (t4 - t3)),
            "mean_tokens_per_row": round(tokens / n, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--sizes_mb", type=int, nargs="+", default=[20, 200])
    parser.add_argument("--loader_only", action="store_true", help="skip the validate / stats memory rows")
    parser.add_argument("--json", default=None, help="write the loader figures here")
    args = parser.parse_args(argv)
    loader = {}
    with tempfile.TemporaryDirectory() as tmp:
        print("| file | rows | index built s | index from cache s | rows/s (1 process) | tokens/s | tokens/row |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for size in args.sizes_mb:
            path = Path(tmp) / f"sft_{size}mb.jsonl"
            make_sft_file(path, size)
            f = loader[f"{size}MB"] = loader_figures(path)
            print(f"| {size} MB | {f['rows']:,} | {f['index_build_s']} | {f['index_cached_s']} | {f['rows_per_s']:,} "
                  f"| {f['tokens_per_s']:,} | {f['mean_tokens_per_row']} |", flush=True)
            path.unlink()
    if args.json:
        import platform

        Path(args.json).write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                               "loader": loader}, indent=1) + "\n", encoding="utf-8")
    if args.loader_only:
        return loader
    print("| file | rows | command | peak RSS MB | seconds |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes_mb:
            path = Path(tmp) / f"sft_{size}mb.jsonl"
            rows = make_sft_file(path, size)
            for command in (["validate", str(path), "--stage", "sft"],
                            ["stats", str(path), "--image_dir", tmp]):
                rss, seconds = peak_rss(command)
                print(f"| {size} MB | {rows:,} | {command[0]} | {rss:.0f} | {seconds:.0f} |", flush=True)
            path.unlink()


if __name__ == "__main__":
    main()
