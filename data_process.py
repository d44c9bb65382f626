"""Get, convert and validate the training data: one tool, streaming, every output written aside and renamed.

    python data_process.py download sft dpo                  # stage names or file names, or "all", into dataset/
    python data_process.py tokenizer --out_dir minimind_tokenizer   # MiniMind's tokenizer, checked; then --tokenizer
    python data_process.py magpie a.parquet b.parquet --out dataset/dpo_magpie.jsonl
    python data_process.py medical path/to/Chinese-medical-dialogue --out dataset/lora_medical.jsonl --val_ratio 0.02
    python data_process.py validate dataset/sft_mini_512.jsonl --stage sft
    python data_process.py stats dataset/sft_mini_512.jsonl --stage sft

download / tokenizer use the `modelscope` library (dataset gongjy/minimind_dataset, model gongjy/MiniMind2).
magpie reads MagpieLM-DPO parquet files (uuid, instruction, chosen, rejected) batch by batch with pyarrow.
medical reads the Chinese medical dialogue CSVs (one folder per department, GB18030, columns department, title, ask,
answer) in chunks with pandas. validate checks a file against a stage's schema; stats gives its token lengths.
"""

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from dataset.dpo import check_preference
from dataset.jsonl import BadLineError, check_conversations, check_text
from dataset.rewards import is_well_formatted

DATASET_ID = "gongjy/minimind_dataset"
TOKENIZER_MODEL_ID = "gongjy/MiniMind2"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]
STAGE_FILES = {"pretrain": "pretrain_hq.jsonl", "sft": "sft_mini_512.jsonl", "kd": "sft_1024.jsonl",
               "dpo": "dpo.jsonl", "reason": "r1_mix_1024.jsonl", "lora": "lora_medical.jsonl"}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 in MiniMind's tokenizer and ours
OFFLINE_HELP = ("could not reach ModelScope to fetch {what} ({error}). If this machine is offline, download the "
                "file(s) elsewhere from https://www.modelscope.cn/{kind}/{repo_id} and copy them into {where}; every "
                "stage also takes --data_path / --tokenizer pointing anywhere.")


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path beside `path`; rename it into place only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink() if tmp.is_file() else shutil.rmtree(tmp)


def write_jsonl(f, row) -> None:
    f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _network_errors() -> tuple:
    errors = [ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        import requests
        errors += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    with contextlib.suppress(ImportError):
        from modelscope.hub.errors import NetworkError, RequestTimeoutError
        errors += [NetworkError, RequestTimeoutError]
    return tuple(errors)


# ---------------------------------------------------------------------------------------------------- download

def modelscope_dataset_file(dataset_id: str, file_name: str, local_dir: Path) -> Path:
    """The network boundary: one file of a ModelScope dataset into local_dir (tests replace this)."""
    from modelscope.hub.file_download import dataset_file_download

    return Path(dataset_file_download(dataset_id=dataset_id, file_path=file_name, local_dir=str(local_dir)))


def resolve_files(names) -> list:
    files = []
    for name in names:
        if name == "all":
            files += list(STAGE_FILES.values())
        elif name in STAGE_FILES:
            files.append(STAGE_FILES[name])
        elif name in STAGE_FILES.values():
            files.append(name)
        else:
            raise SystemExit(f"unknown stage or file {name!r}: choose from {sorted(STAGE_FILES)} or "
                             f"{sorted(STAGE_FILES.values())}, or 'all'")
    return list(dict.fromkeys(files))


def download(names, out_dir="dataset", fetch=modelscope_dataset_file) -> dict:
    """Fetch the files into out_dir. A file is renamed into place only once complete, so one that exists is
    complete and skipped."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = {"downloaded": [], "skipped": []}
    for name in resolve_files(names):
        target = out_dir / name
        if target.exists():
            print(f"{target}: already complete, skipped")
            done["skipped"].append(name)
            continue
        part = out_dir / f".{name}.part"
        try:
            got = fetch(DATASET_ID, name, part)
        except _network_errors() as e:
            shutil.rmtree(part, ignore_errors=True)
            raise SystemExit(OFFLINE_HELP.format(what=name, error=type(e).__name__, kind="datasets",
                                                 repo_id=DATASET_ID, where=out_dir)) from None
        os.replace(got, target)
        shutil.rmtree(part, ignore_errors=True)
        print(f"{target}: {target.stat().st_size / 2**20:.1f} MiB")
        done["downloaded"].append(name)
    return done


# ---------------------------------------------------------------------------------------------------- tokenizer

def modelscope_model_files(model_id: str, files: list, local_dir: Path) -> Path:
    """The network boundary: some files of a ModelScope model repo into local_dir (tests replace this)."""
    from modelscope.hub.snapshot_download import snapshot_download

    return Path(snapshot_download(model_id=model_id, allow_patterns=files, local_dir=str(local_dir)))


def check_tokenizer(path) -> list:
    """What would stop our stages from using this tokenizer (empty if nothing)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    problems = [f"id {i} is {tok.convert_ids_to_tokens(i)!r}, expected {t!r}" for i, t in enumerate(SPECIAL_TOKENS)
                if tok.convert_ids_to_tokens(i) != t]
    if not tok.chat_template:
        problems.append("no chat template")
    return problems


def get_tokenizer(out_dir, fetch=modelscope_model_files) -> Path:
    out_dir = Path(out_dir)
    with atomic_output(out_dir.with_name(out_dir.name + ".download")) as tmp:
        try:
            got = fetch(TOKENIZER_MODEL_ID, TOKENIZER_FILES, tmp)
        except _network_errors() as e:
            raise SystemExit(OFFLINE_HELP.format(what="the tokenizer", error=type(e).__name__, kind="models",
                                                 repo_id=TOKENIZER_MODEL_ID, where=out_dir)) from None
        problems = check_tokenizer(got)
        if problems:
            raise SystemExit(f"the tokenizer from {TOKENIZER_MODEL_ID} cannot be used: {'; '.join(problems)}")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(got, out_dir)
    print(f"{out_dir}: MiniMind tokenizer checked (ids 0-2, chat template); use --tokenizer {out_dir}")
    return out_dir


# ---------------------------------------------------------------------------------------------------- magpie

def _messages(value):
    """Magpie's [{content, role}, ...] as our [{role, content}, ...]; None if it is not a usable chat."""
    if not isinstance(value, list) or not value:
        return None
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return None
        if not m["content"].strip():
            return None
        out.append({"role": m["role"], "content": m["content"]})
    return out


def magpie(inputs, out, batch_size=1024) -> Counter:
    """MagpieLM-DPO parquet -> DPO jsonl, one record batch at a time."""
    import pyarrow.parquet as pq

    counts = Counter()
    with atomic_output(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for path in inputs:
            pf = pq.ParquetFile(path)
            with tqdm(total=pf.metadata.num_rows, desc=Path(path).name, unit="row") as bar:
                for batch in pf.iter_batches(batch_size=batch_size, columns=["chosen", "rejected"]):
                    for row in batch.to_pylist():
                        counts["read"] += 1
                        chosen, rejected = _messages(row["chosen"]), _messages(row["rejected"])
                        if chosen is None or rejected is None:
                            counts["dropped: empty or malformed"] += 1
                        elif chosen == rejected:
                            counts["dropped: chosen == rejected"] += 1
                        else:
                            write_jsonl(f, {"chosen": chosen, "rejected": rejected})
                            counts["written"] += 1
                    bar.update(batch.num_rows)
    return counts


# ---------------------------------------------------------------------------------------------------- medical

def medical(root, out, val_out=None, val_ratio=0.0, seed=42, min_len=2, max_len=1024, chunksize=50_000) -> Counter:
    """Medical dialogue CSVs (GB18030) -> SFT jsonl, deduplicated, length-filtered, shuffled with `seed`."""
    import pandas as pd

    files = sorted(Path(root).rglob("*.csv"))
    if not files:
        raise SystemExit(f"no .csv files under {root}")
    counts, seen, rows = Counter(), set(), []
    for path in tqdm(files, desc="csv files", unit="file"):
        department = path.parent.name if path.parent != Path(root) else path.stem
        reader = pd.read_csv(path, encoding="gb18030", encoding_errors="replace", chunksize=chunksize, dtype=str,
                             keep_default_na=False, usecols=["ask", "answer"])
        for chunk in reader:
            for ask, answer in zip(chunk["ask"], chunk["answer"]):
                counts["read"] += 1
                ask, answer = ask.strip(), answer.strip()
                if not ask or not answer:
                    counts["dropped: empty"] += 1
                elif "\ufffd" in ask or "\ufffd" in answer:
                    counts["dropped: undecodable bytes"] += 1
                elif not min_len <= len(ask) + len(answer) <= max_len:
                    counts["dropped: length"] += 1
                elif (ask, answer) in seen:
                    counts["dropped: duplicate"] += 1
                else:
                    seen.add((ask, answer))
                    rows.append((department, ask, answer))
    random.Random(seed).shuffle(rows)
    n_val = int(round(len(rows) * val_ratio)) if val_out else 0
    for path, part in ((out, rows[n_val:]), (val_out, rows[:n_val])):
        if path is None:
            continue
        with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for _, ask, answer in part:
                write_jsonl(f, {"conversations": [{"role": "user", "content": ask},
                                                  {"role": "assistant", "content": answer}]})
    counts["written"], counts["validation"] = len(rows) - n_val, n_val
    for department, _, _ in rows:
        counts[f"department {department}"] += 1
    return counts


# ---------------------------------------------------------------------------------------------------- validate

def check_reason(obj) -> None:
    check_conversations(obj)
    reply = [m for m in obj["conversations"] if m["role"] == "assistant"][-1]["content"]
    if not is_well_formatted(reply):
        raise BadLineError("the last reply is not <think>...</think><answer>...</answer>")


CHECKS = {"pretrain": check_text, "sft": check_conversations, "dpo": check_preference, "reason": check_reason}


def iter_lines(path, desc=None):
    """(line number, raw bytes) of the non-blank lines, streaming, with a progress bar over bytes."""
    with open(path, "rb") as f, tqdm(total=os.path.getsize(path), desc=desc or Path(path).name, unit="B",
                                     unit_scale=True, leave=False) as bar:
        for lineno, raw in enumerate(f, start=1):
            bar.update(len(raw))
            if raw.strip():
                yield lineno, raw


def validate(path, stage, show=10) -> dict:
    """{"good", "bad", "first_bad": [(line, reason), ...]}: each line parsed and checked, nothing kept."""
    check, good, bad, first_bad = CHECKS[stage], 0, 0, []
    for lineno, raw in iter_lines(path):
        try:
            check(json.loads(raw))
            good += 1
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError and BadLineError are ValueErrors
            bad += 1
            if len(first_bad) < show:
                first_bad.append((lineno, str(e)))
    return {"good": good, "bad": bad, "first_bad": first_bad}


# ---------------------------------------------------------------------------------------------------- stats

def render(row, tokenizer) -> list:
    """The texts a stage feeds the model for one row (a DPO row gives two)."""
    if "text" in row:
        return [row["text"]]
    chats = [row["conversations"]] if "conversations" in row else [row["chosen"], row["rejected"]]
    return [tokenizer.apply_chat_template(c, tokenize=False) for c in chats]


def sample_rows(path, n, seed=0):
    """Reservoir sample of n parsed rows (all rows if fewer), in one streaming pass; (rows, lines seen)."""
    rng, reservoir, seen = random.Random(seed), [], 0
    for _, raw in iter_lines(path):
        seen += 1
        if len(reservoir) < n:
            reservoir.append(raw)
        else:
            j = rng.randrange(seen)
            if j < n:
                reservoir[j] = raw
    rows = []
    for raw in reservoir:
        with contextlib.suppress(ValueError):
            rows.append(json.loads(raw))
    return rows, seen


def stats(path, tokenizer, sample=20_000, seed=0, image=None) -> dict:
    import numpy as np

    rows, n_lines = sample_rows(path, sample, seed)
    lengths = []
    for i in range(0, len(rows), 1000):  # in chunks: a tokenizer's encodings of 20k texts would weigh gigabytes
        texts = [t for row in rows[i:i + 1000] for t in render(row, tokenizer)]
        lengths += [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    lengths = np.array(lengths)
    q = {p: float(np.percentile(lengths, p)) for p in (50, 90, 95, 99)}
    result = {"lines": n_lines, "sampled": len(rows), "texts": len(lengths), "mean": float(lengths.mean()),
              "max": int(lengths.max()), **{f"p{p}": v for p, v in q.items()},
              "max_seq_len_95": int(np.ceil(q[95])), "max_seq_len_99": int(np.ceil(q[99]))}
    if image:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        ax.hist(lengths, bins=60)
        for p in (95, 99):
            ax.axvline(q[p], color="k", linestyle="--" if p == 95 else ":", label=f"p{p} = {q[p]:.0f}")
        ax.set_xlabel("tokens per sample")
        ax.set_ylabel("samples")
        ax.set_title(f"{Path(path).name} ({len(lengths)} samples)")
        ax.legend()
        fig.tight_layout()
        with atomic_output(image) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        result["image"] = str(image)
    return result


# ---------------------------------------------------------------------------------------------------- CLI

def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("download", help=f"files of {DATASET_ID} from ModelScope")
    p.add_argument("names", nargs="+", help=f"stage names {sorted(STAGE_FILES)}, file names, or all")
    p.add_argument("--out_dir", default="dataset")
    p = sub.add_parser("tokenizer", help="MiniMind's tokenizer from ModelScope, checked")
    p.add_argument("--out_dir", default="minimind_tokenizer")
    p = sub.add_parser("magpie", help="MagpieLM-DPO parquet -> DPO jsonl")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", default="dataset/dpo_magpie.jsonl")
    p.add_argument("--batch_size", type=int, default=1024)
    p = sub.add_parser("medical", help="medical dialogue CSVs -> SFT jsonl")
    p.add_argument("root", help="folder holding the department folders of CSV files")
    p.add_argument("--out", default="dataset/lora_medical.jsonl")
    p.add_argument("--val_out", default=None, help="also write a validation split here")
    p.add_argument("--val_ratio", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--min_len", type=int, default=2, help="minimum characters of question + answer")
    p.add_argument("--max_len", type=int, default=1024, help="maximum characters of question + answer")
    p = sub.add_parser("validate", help="check a file against a stage's schema")
    p.add_argument("path")
    p.add_argument("--stage", choices=sorted(CHECKS), required=True)
    p.add_argument("--max_bad", type=int, default=0, help="exit with status 1 above this many bad lines")
    p.add_argument("--show", type=int, default=10, help="how many bad lines to print")
    p = sub.add_parser("stats", help="token lengths of a file")
    p.add_argument("path")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: ours)")
    p.add_argument("--sample", type=int, default=20_000, help="rows sampled (reservoir) from huge files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image_dir", default="images")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.command == "download":
        result = download(args.names, args.out_dir)
    elif args.command == "tokenizer":
        result = {"tokenizer": str(get_tokenizer(args.out_dir))}
    elif args.command == "magpie":
        result = dict(magpie(args.inputs, args.out, args.batch_size))
    elif args.command == "medical":
        result = dict(medical(args.root, args.out, args.val_out, args.val_ratio, args.seed, args.min_len,
                              args.max_len))
    elif args.command == "validate":
        result = validate(args.path, args.stage, args.show)
        for lineno, reason in result["first_bad"]:
            print(f"{args.path}:{lineno}: {reason}")
    else:
        from transformers import AutoTokenizer

        from model import TOKENIZER_DIR

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or TOKENIZER_DIR)
        image = Path(args.image_dir) / f"{Path(args.path).stem}_lengths.png"
        result = stats(args.path, tokenizer, args.sample, args.seed, image)
    print(json.dumps(result, ensure_ascii=False, indent=1))
    if args.command == "validate" and result["bad"] > args.max_bad:
        sys.exit(f"{args.path}: {result['bad']} bad line(s) > --max_bad {args.max_bad}")
    return result


if __name__ == "__main__":
    main()
