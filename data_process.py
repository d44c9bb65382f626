"""Get, convert and validate the training data: one tool, streaming, every output written aside and renamed.

    python data_process.py download sft dpo                  # stage names or file names, or "all", into dataset/
    python data_process.py download --list                   # what the remote holds, and which stage uses what
    python data_process.py tokenizer --out_dir minimind_tokenizer   # MiniMind's tokenizer, checked; then --tokenizer
    python data_process.py magpie a.parquet b.parquet --out dataset/dpo_magpie.jsonl
    python data_process.py medical path/to/Chinese-medical-dialogue --out dataset/lora_medical.jsonl --val_ratio 0.02
    python data_process.py validate dataset/sft_t2t_mini.jsonl --stage sft
    python data_process.py stats dataset/sft_t2t_mini.jsonl

download / tokenizer use the `modelscope` library (dataset gongjy/minimind_dataset, model gongjy/MiniMind2). The
dataset's main line since 2026-04 is pretrain_t2t(_mini), sft_t2t(_mini), dpo, rlaif, agent_rl(_math); each stage
fetches today's file and falls back to the seed's older name (pretrain_hq, sft_mini_512, sft_1024, r1_mix_1024) only
when the remote lacks today's; `all` is every stage but pretrain_full / sft_full (10 / 14 GB). See download --help.
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

from common.cli import HelpFormatter
from dataset.chat import (check_conversations, check_prompt_row, has_reasoning, normalize_chat, template_support,
                          with_fallbacks)
from dataset.dpo import check_preference
from dataset.jsonl import BadLineError, check_text
from trainer.rewards import is_well_formatted

DATASET_ID = "gongjy/minimind_dataset"
TOKENIZER_MODEL_ID = "gongjy/MiniMind2"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]
# What each stage downloads: a list of the files it needs, each a tuple of names tried in order, today's name first
# (the dataset's main line since 2026-04), then the seed's older name as a fallback, as the remote may no longer
# hold it. Only agent needs two files. reason takes sft_t2t_mini: today's reasoning is its rows' reasoning_content.
STAGE_FILES = {
    "pretrain": [("pretrain_t2t_mini.jsonl", "pretrain_hq.jsonl")],
    "pretrain_full": [("pretrain_t2t.jsonl",)],
    "sft": [("sft_t2t_mini.jsonl", "sft_mini_512.jsonl")],
    "sft_full": [("sft_t2t.jsonl",)],
    "kd": [("sft_t2t_mini.jsonl", "sft_1024.jsonl")],
    "dpo": [("dpo.jsonl",)],
    "reason": [("sft_t2t_mini.jsonl", "r1_mix_1024.jsonl")],
    "grpo": [("rlaif.jsonl",)],
    "ppo": [("rlaif.jsonl",)],
    "agent": [("agent_rl.jsonl",), ("agent_rl_math.jsonl",)],
    "lora": [("lora_medical.jsonl",)],
}
ALL_STAGES = [s for s in STAGE_FILES if not s.endswith("_full")]  # "all" leaves out pretrain_t2t, sft_t2t (10, 14 GB)
DOWNLOAD_HELP = ("What each stage name fetches: today's file, or the seed's older name after \"or\" when the remote\n"
                 "no longer holds today's (\"+\": both files).\n\n"
                 + "\n".join(f"  {stage:<14} {' + '.join(' or '.join(c) for c in needs)}"
                             for stage, needs in STAGE_FILES.items())
                 + "\n\nall = the file of every stage except pretrain_full and sft_full (10 GB, 14 GB). A file\n"
                 "name (any *.jsonl of the dataset) is fetched as it is; --list shows what the remote holds. A file\n"
                 "already in --out_dir, under either name, is skipped.")
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


def modelscope_dataset_listing(dataset_id: str) -> list:
    """The network boundary: (path, size in bytes) of every file of a ModelScope dataset (tests replace this)."""
    from modelscope.hub.api import HubApi

    # modelscope 1.40.2's HubApi hands list_repo_files to modelscope_hub.HubApi: it pages through the dataset's
    # repo/tree and returns FileInfo(path, size, type, ...)
    files = HubApi().list_repo_files(dataset_id, repo_type="dataset", recursive=True)
    return [(f.path, f.size) for f in files if f.type != "tree"]


def is_missing(error: BaseException) -> bool:
    """Whether a download failed because the remote has no such file: the hub's NotExistError (its answer to an
    HTTP 404), which modelscope 1.40.2's dataset_file_download re-raises as a requests HTTPError with no response
    object, chained from it; or any error carrying an HTTP 404."""
    try:
        from modelscope.hub.errors import NotExistError
    except ImportError:
        NotExistError = ()
    while error is not None:
        if isinstance(error, NotExistError):
            return True
        status = getattr(getattr(error, "response", None), "status_code", None) or getattr(error, "status_code", None)
        if status == 404:
            return True
        error = error.__cause__
    return False


def resolve_files(names) -> list:
    """[(what, names to try in order), ...] for stage names, "all" or file names, each set of names once."""
    wants = {}
    for name in names:
        if name == "all" or name in STAGE_FILES:
            for stage in ALL_STAGES if name == "all" else [name]:
                for candidates in STAGE_FILES[stage]:
                    wants.setdefault(candidates, []).append(stage)
        elif name.endswith(".jsonl") and not Path(name).is_absolute() and ".." not in Path(name).parts:
            wants.setdefault((name,), []).append(name)  # any file of the dataset, known to our stages or not
        else:
            raise SystemExit(f"unknown stage or file {name!r}: choose from {list(STAGE_FILES)}, 'all', or a *.jsonl "
                             f"file of {DATASET_ID} (see what it holds: python data_process.py download --list)")
    return [("/".join(dict.fromkeys(labels)), candidates) for candidates, labels in wants.items()]


def _nothing_found(what: str, tried: list) -> SystemExit:
    if what in tried:
        head = f"{what} is not on {DATASET_ID}."
    else:
        head = f"stage {what}: {DATASET_ID} holds none of {', '.join(tried)} (tried in this order)."
    build = (" Or build it from the medical dialogue CSVs: `python data_process.py medical FOLDER --out "
             "dataset/lora_medical.jsonl`." if "lora_medical.jsonl" in tried else "")
    return SystemExit(f"{head} See what it holds with `python data_process.py download --list`, then download a "
                      f"file by name (`python data_process.py download NAME.jsonl`) and give it to the stage with "
                      f"--data_path.{build}")


def download(names, out_dir="dataset", fetch=None) -> dict:
    """Fetch the files into out_dir, for each stage today's name first and the seed's when the remote lacks it.
    A file is renamed into place only once complete, so one that exists (either name) is complete and skipped."""
    fetch = fetch or modelscope_dataset_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done, missing = {"downloaded": [], "skipped": [], "fallback": {}}, set()
    for what, candidates in resolve_files(names):
        here = next((name for name in candidates if (out_dir / name).exists()), None)
        if here is not None:
            if here not in done["downloaded"] and here not in done["skipped"]:
                note = f" (the older name; today's is {candidates[0]})" if here != candidates[0] else ""
                print(f"{out_dir / here}: already complete{note}, skipped")
                done["skipped"].append(here)
            continue
        for i, name in enumerate(candidates):
            if name not in missing:
                if _fetch_one(name, out_dir, fetch):
                    done["downloaded"].append(name)
                    if i:
                        done["fallback"][what] = name
                    break
                missing.add(name)
            if i + 1 < len(candidates):
                print(f"{name}: not on {DATASET_ID}; {what} falls back to the older {candidates[i + 1]}")
        else:
            raise _nothing_found(what, list(candidates))
    return done


def _fetch_one(name: str, out_dir: Path, fetch) -> bool:
    """Download one file into out_dir/name; False if the remote has no such file."""
    target = out_dir / name
    part = out_dir / f".{target.name}.part"
    try:
        got = fetch(DATASET_ID, name, part)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(got, target)
    except _network_errors() as e:
        raise SystemExit(OFFLINE_HELP.format(what=name, error=type(e).__name__, kind="datasets",
                                             repo_id=DATASET_ID, where=out_dir)) from None
    except Exception as e:
        if is_missing(e):
            return False
        raise
    finally:
        shutil.rmtree(part, ignore_errors=True)
    print(f"{target}: {target.stat().st_size / 2**20:.1f} MiB")
    return True


def _size(n: int) -> str:
    """Decimal units, as the dataset's page gives them (1.2 GB = 1.2e9 bytes)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def stage_marks() -> dict:
    """{file name: ["sft", "kd (fallback)", ...]}: which stages use each file, and whether as the older name."""
    marks = {}
    for stage, needs in STAGE_FILES.items():
        for candidates in needs:
            for i, name in enumerate(candidates):
                marks.setdefault(name, []).append(stage + (" (fallback)" if i else ""))
    return marks


def list_remote(out_dir="dataset", listing=None) -> dict:
    """Print what the remote dataset holds, name and size, with the stages that use each file."""
    try:
        files = sorted((listing or modelscope_dataset_listing)(DATASET_ID))
    except _network_errors() as e:
        raise SystemExit(OFFLINE_HELP.format(what=f"the file list of {DATASET_ID}", error=type(e).__name__,
                                             kind="datasets", repo_id=DATASET_ID, where=out_dir)) from None
    except Exception as e:
        if is_missing(e):
            raise SystemExit(f"ModelScope has no dataset {DATASET_ID} (HTTP 404); see "
                             f"https://www.modelscope.cn/datasets/{DATASET_ID}") from None
        raise
    marks = stage_marks()
    width = max([len(path) for path, _ in files] + [4])
    print(f"{DATASET_ID}: {len(files)} files")
    print(f"{'file':<{width}}  {'size':>10}  used by")
    for path, size in files:
        print(f"{path:<{width}}  {_size(size):>10}  {', '.join(marks.get(path, [])) or '-'}")
    remote = {path for path, _ in files}
    absent = [name for name in marks if name not in remote]
    if absent:
        print("not on the remote: " + ", ".join(f"{n} ({', '.join(marks[n])})" for n in absent))
    return {"dataset": DATASET_ID, "files": len(files), "total_bytes": sum(size for _, size in files),
            "used": sorted(remote & set(marks)), "absent": absent}


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
    """A reasoning row: the last reply thinks, as today's files write it (reasoning_content) or as the seed's did
    (`<think>…</think><answer>…</answer>` in the content)."""
    check_conversations(obj)
    reply = [m for m in obj["conversations"] if m["role"] == "assistant"][-1]
    if isinstance(reply.get("reasoning_content"), str) and reply["reasoning_content"].strip():
        return
    if not is_well_formatted(reply["content"]):
        raise BadLineError("the last reply has no reasoning_content and is not <think>...</think><answer>...</answer>")


def check_agent(obj) -> None:
    check_prompt_row(obj)
    if obj.get("gt") is None:
        raise BadLineError('missing key "gt" (the accepted final answers)')


CHECKS = {"pretrain": check_text, "sft": check_conversations, "dpo": check_preference, "reason": check_reason,
          "grpo": check_prompt_row, "ppo": check_prompt_row, "agent": check_agent}


def row_kinds(obj) -> list:
    """What a good row holds, for the summary: tools, tool calls, tool results, reasoning, prompt-only, gt."""
    chats = [obj[k] for k in ("conversations", "chosen", "rejected") if isinstance(obj, dict) and k in obj]
    kinds = set()
    for chat in chats:
        messages, tools = normalize_chat(chat, complete=False)
        kinds |= {"tools"} if tools else set()
        kinds |= {"tool_calls" for m in messages if m.get("tool_calls")}
        kinds |= {"tool_results" for m in messages if m["role"] == "tool"}
        kinds |= {"reasoning" for m in messages if m["role"] == "assistant" and has_reasoning(m)}
        last = messages[-1]
        if last["role"] != "assistant" or not (last["content"].strip() or last.get("tool_calls")):
            kinds.add("prompt_only")
    if isinstance(obj, dict) and obj.get("gt") is not None:
        kinds.add("gt")
    return sorted(kinds)


def iter_lines(path, desc=None):
    """(line number, raw bytes) of the non-blank lines, streaming, with a progress bar over bytes."""
    with open(path, "rb") as f, tqdm(total=os.path.getsize(path), desc=desc or Path(path).name, unit="B",
                                     unit_scale=True, leave=False) as bar:
        for lineno, raw in enumerate(f, start=1):
            bar.update(len(raw))
            if raw.strip():
                yield lineno, raw


def validate(path, stage, show=10) -> dict:
    """{"good", "bad", "first_bad": [(line, reason), ...], "rows_with": {kind: good rows}}: each line parsed and
    checked, nothing kept; rows_with counts the good rows holding tools, tool calls, tool results, reasoning,
    prompt-only turns and gt."""
    check, good, bad, first_bad, kinds = CHECKS[stage], 0, 0, [], Counter()
    for lineno, raw in iter_lines(path):
        try:
            obj = json.loads(raw)
            check(obj)
            good += 1
            if stage != "pretrain":
                kinds.update(row_kinds(obj))
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError and BadLineError are ValueErrors
            bad += 1
            if len(first_bad) < show:
                first_bad.append((lineno, str(e)))
    return {"good": good, "bad": bad, "first_bad": first_bad, "rows_with": dict(sorted(kinds.items()))}


# ---------------------------------------------------------------------------------------------------- stats

def render(row, tokenizer) -> list:
    """The texts a stage feeds the model for one row (a DPO row gives two), tools and tool calls included."""
    if "text" in row:
        return [row["text"]]
    chats = [row["conversations"]] if "conversations" in row else [row["chosen"], row["rejected"]]
    texts = []
    for chat in chats:
        messages, tools = with_fallbacks(*normalize_chat(chat, complete=False), template_support(tokenizer))
        texts.append(tokenizer.apply_chat_template(messages, tools=tools, tokenize=False))
    return texts


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
    lengths, unusable, kinds = [], 0, Counter()
    for i in range(0, len(rows), 1000):  # in chunks: a tokenizer's encodings of 20k texts would weigh gigabytes
        texts = []
        for row in rows[i:i + 1000]:
            try:
                texts += render(row, tokenizer)
                kinds.update(row_kinds(row) if "text" not in row else [])
            except (ValueError, KeyError, TypeError, AttributeError):  # a bad row: `validate` says which and why
                unusable += 1
        lengths += [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    if not lengths:
        raise SystemExit(f"{path}: none of the {len(rows)} sampled rows is usable; run `validate` on it")
    lengths = np.array(lengths)
    q = {p: float(np.percentile(lengths, p)) for p in (50, 90, 95, 99)}
    result = {"lines": n_lines, "sampled": len(rows), "unusable": unusable, "rows_with": dict(sorted(kinds.items())),
              "texts": len(lengths), "mean": float(lengths.mean()),
              # the whole file's tokens, estimated from the sample: lines x texts per usable row x mean length
              "tokens_estimate": round(n_lines * len(lengths) / max(1, len(rows) - unusable) * float(lengths.mean())),
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, **kwargs):
        return sub.add_parser(name, formatter_class=HelpFormatter, **kwargs)

    p = add("download", help=f"files of {DATASET_ID} from ModelScope (--list: what it holds)",
            description=DOWNLOAD_HELP)
    p.add_argument("names", nargs="*", help=f"stage names {list(STAGE_FILES)}; all (every stage but "
                                            f"pretrain_full, sft_full); or any *.jsonl file of the dataset")
    p.add_argument("--list", action="store_true", help="list the remote's files and sizes, marking the ones our "
                                                       "stages use, and download nothing")
    p.add_argument("--out_dir", default="dataset")
    p = add("tokenizer", help="MiniMind's tokenizer from ModelScope, checked")
    p.add_argument("--out_dir", default="minimind_tokenizer")
    p = add("magpie", help="MagpieLM-DPO parquet -> DPO jsonl")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", default="dataset/dpo_magpie.jsonl")
    p.add_argument("--batch_size", type=int, default=1024)
    p = add("medical", help="medical dialogue CSVs -> SFT jsonl")
    p.add_argument("root", help="folder holding the department folders of CSV files")
    p.add_argument("--out", default="dataset/lora_medical.jsonl")
    p.add_argument("--val_out", default=None, help="also write a validation split here")
    p.add_argument("--val_ratio", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--min_len", type=int, default=2, help="minimum characters of question + answer")
    p.add_argument("--max_len", type=int, default=1024, help="maximum characters of question + answer")
    p = add("validate", help="check a file against a stage's schema")
    p.add_argument("path")
    p.add_argument("--stage", choices=sorted(CHECKS), required=True)
    p.add_argument("--max_bad", type=int, default=0, help="exit with status 1 above this many bad lines")
    p.add_argument("--show", type=int, default=10, help="how many bad lines to print")
    p = add("stats", help="token lengths of a file")
    p.add_argument("path")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: ours)")
    p.add_argument("--sample", type=int, default=20_000, help="rows sampled (reservoir) from huge files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image_dir", default="images")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.command == "download":
        if not args.names and not args.list:
            raise SystemExit("download: name stages or files (or all), or --list to see what the remote holds")
        result = list_remote(args.out_dir) if args.list else download(args.names, args.out_dir)
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
