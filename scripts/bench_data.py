"""Peak memory of `data_process.py validate` and `stats` on generated jsonl files of growing size: it stays flat.

    python scripts/bench_data.py                  # 20 MB and 200 MB SFT files in a temporary folder
    python scripts/bench_data.py --sizes_mb 20 200 1000

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

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import resource, sys, json
sys.argv = ["data_process.py", *json.loads(sys.argv[1])]
sys.path.insert(0, {root!r})
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes_mb", type=int, nargs="+", default=[20, 200])
    args = parser.parse_args(argv)
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
