"""Standard benchmarks through lm-evaluation-harness, on any stage's checkpoint or any Hugging Face folder (no export),
and perplexity against context length.

    python scripts/eval_bench.py --stage sft                          # MiniMind's set (below), zero-shot
    python scripts/eval_bench.py --model_path export/hf --tasks gsm8k,mmlu --limit 200 --batch_size 16
    python scripts/eval_bench.py --stage sft --tasks my_task --include_path my_tasks/    # your own YAML tasks
    python scripts/eval_bench.py --stage pretrain --ppl_vs_len held_out.jsonl --lengths 128,256,512,1024,2048

Our model runs inside lm-eval through `MicroLMEval` (an lm-eval `TemplateLM`): log-likelihoods from one batched
forward per request group, generation through the inference core (the one decode loop chat and the server use).
Any transformers causal LM loads the same way (`--model_path`, inference/load.py).

Offline by default: task data comes from the Hugging Face datasets cache (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are
set unless --download). Data that is not there stops the run with the commands that fetch it, not a stack trace.
Results: a markdown table, --json, and an entry in <out_dir>/report.json (the report card, trainer/report.py).
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from common.cli import HelpFormatter
from dataset.jsonl import read_jsonl


# MiniMind's README reports these (lm-evaluation-harness, zero-shot)
MINIMIND_TASKS = "ceval-valid,cmmlu,arc_easy,piqa,openbookqa,hellaswag,social_iqa"
# the score shown per task: the first of these lm-eval metric keys that the task reports
PREFERRED = ("acc_norm,none", "acc,none", "exact_match,strict-match", "exact_match,flexible-extract",
             "exact_match,none", "word_perplexity,none")


def build_parser():
    from inference.load import add_model_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(parser)
    parser.add_argument("--tasks", default=MINIMIND_TASKS, help="comma-separated lm-eval task or group names")
    parser.add_argument("--include_path", default=None, help="a folder of your own lm-eval task YAML files")
    parser.add_argument("--num_fewshot", type=int, default=None)
    parser.add_argument("--limit", type=float, default=None, help="at most this many documents per task (or share)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=None, help="context in tokens (default: the model's)")
    parser.add_argument("--download", action="store_true",
                        help="allow the Hugging Face hub (HF_ENDPOINT for a mirror); default: the local cache only")
    parser.add_argument("--json", default=None, help="write the results here (default: out/eval/bench_<time>.json)")
    parser.add_argument("--ppl_vs_len", default=None, metavar="FILE",
                        help="instead of tasks: perplexity of this held-out text (.txt or .jsonl with 'text') at "
                             "several context lengths, with and without YaRN")
    parser.add_argument("--lengths", default="128,256,512,1024,2048,4096")
    parser.add_argument("--trained_len", type=int, default=512,
                        help="--ppl_vs_len: the context the model was trained at (YaRN's original length)")
    parser.add_argument("--windows", type=int, default=8, help="--ppl_vs_len: windows per length")
    parser.add_argument("--image", default="images/ppl_vs_len.png")
    return parser


# ---------------------------------------------------------------------------------------------------------- lm-eval

def continuation_logps(model, device, rows, batch_size: int) -> list:
    """(sum of log p(continuation | context), whether greedy decoding would have written it) for each (whole token
    list, continuation length); batches of similar length, right-padded."""
    import torch
    import torch.nn.functional as F

    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out = [None] * len(rows)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            width = max(len(rows[i][0]) for i in batch) - 1
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, i in enumerate(batch):
                ids[j, :len(rows[i][0]) - 1] = torch.tensor(rows[i][0][:-1])
                mask[j, :len(rows[i][0]) - 1] = 1
            logp = F.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
            for j, i in enumerate(batch):
                whole, n = rows[i]
                targets = torch.tensor(whole[-n:], device=device)
                here = logp[j, len(whole) - 1 - n:len(whole) - 1]
                out[i] = (float(here.gather(1, targets[:, None]).sum()), bool((here.argmax(-1) == targets).all()))
    return out


def make_lm(engine, batch_size: int, max_length: int):
    """An lm-eval `TemplateLM` around the inference core's Engine (built lazily: lm-eval is imported on demand)."""
    from lm_eval import utils
    from lm_eval.api.model import TemplateLM

    from inference import Sampling

    class MicroLMEval(TemplateLM):
        def __init__(self):
            super().__init__()
            self.engine, self.tokenizer = engine, engine.tokenizer
            self.batch_size, self.max_length = batch_size, max_length

        @property
        def eot_token_id(self):
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self):  # the token an empty context is conditioned on
            return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id

        def tok_encode(self, string, add_special_tokens=None, **kwargs):
            return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

        def tok_decode(self, tokens, **kwargs):
            return self.tokenizer.decode(tokens)

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
            # the continuation's logits sit at the end of whole[:-1]; the context is cut from the left to fit
            rows = [((context + continuation)[-(self.max_length + 1):], len(continuation))
                    for _, context, continuation in requests]
            return continuation_logps(self.engine.model, self.engine.device, rows, self.batch_size)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            """Whole-document log-likelihood in disjoint windows of max_length (perplexity tasks)."""
            scores = []
            for (string,) in [r.args for r in requests]:
                windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1))
                parts = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
                scores.append(sum(lp for lp, _ in parts))
            return scores

        def generate_until(self, requests, disable_tqdm=False):
            """Greedy (or sampled, as the task asks) through the inference core, cut at the task's stop strings."""
            out = [None] * len(requests)
            groups = {}
            for i, r in enumerate(requests):
                context, kwargs = r.args
                groups.setdefault(json.dumps(kwargs, sort_keys=True, default=str), []).append((i, context))
            for key, items in groups.items():
                kwargs = json.loads(key)
                until = kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
                until = [until] if isinstance(until, str) else until
                new = int(kwargs.get("max_gen_toks", 256))
                temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
                sampling = Sampling(max_new_tokens=new, temperature=temperature)
                prompts = [self.tok_encode(c)[-(self.max_length - new):] for _, c in items]
                replies = self.engine.generate(prompts, sampling, batch_size=self.batch_size)
                for (i, _), (ids, _) in zip(items, replies):
                    text = self.tokenizer.decode(ids, skip_special_tokens=True)
                    for stop in until:
                        text = text.split(stop)[0] if stop else text
                    out[i] = text
            return out

    return MicroLMEval()


def offline_help(tasks, include_path, error) -> str:
    """What to run when task data is missing from the cache: the hub, a mirror, or ModelScope."""
    datasets = []
    try:
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import load_yaml_config

        index = TaskManager(include_path=include_path).task_index
        for t in tasks:
            if t in index and index[t].get("yaml_path") and index[t]["yaml_path"] != -1:
                path = load_yaml_config(index[t]["yaml_path"], mode="simple").get("dataset_path")
                datasets.append(f"{t}: {path}")
    except Exception:  # the message must come out even if lm-eval's index cannot be read
        pass
    cache = os.environ.get("HF_DATASETS_CACHE", "~/.cache/huggingface/datasets")
    again = " ".join(a for a in sys.argv[1:] if a != "--download")
    return (f"the data of {', '.join(tasks)} is not in the Hugging Face datasets cache ({cache}) and this run is "
            f"offline ({type(error).__name__}: {str(error)[:300]}).\n"
            + ("Datasets: " + "; ".join(datasets) + "\n" if datasets else "")
            + "Fetch it once, then rerun without --download:\n"
            f"  python scripts/eval_bench.py {again} --download                          # Hugging Face hub\n"
            f"  HF_ENDPOINT=https://hf-mirror.com python scripts/eval_bench.py {again} --download   # a mirror\n"
            "  or from ModelScope: modelscope download --dataset <the dataset above> --local_dir DIR, then a task YAML "
            "whose dataset_path is DIR (--include_path)")


def score_of(metrics: dict) -> tuple:
    for key in PREFERRED:
        if key in metrics and isinstance(metrics[key], (int, float)):
            return key.split(",")[0], float(metrics[key])
    return None, None


def run_tasks(args, engine, path) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    max_length = args.max_length or getattr(engine.model.config, "max_position_embeddings", 2048)
    lm = make_lm(engine, args.batch_size, max_length)
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                          task_manager=TaskManager(include_path=args.include_path),
                                          log_samples=False, bootstrap_iters=0)
    except Exception as e:  # missing data offline shows up as one of several hub / datasets errors
        chain, err = [], e
        while err is not None:
            chain.append(f"{type(err).__name__} {err}")
            err = err.__cause__ or err.__context__
        text = " ".join(chain).lower()
        if not args.download and any(k in text for k in ("offline", "connection", "couldn't reach", "not found",
                                                         "doesn't exist", "no such file", "cannot find")):
            raise SystemExit(offline_help(tasks, args.include_path, e)) from None
        raise
    rows = {}
    for task, metrics in results["results"].items():
        name, value = score_of(metrics)
        if name is not None:
            rows[task] = {"metric": name, "score": value, "all": {k: v for k, v in metrics.items()
                                                                  if isinstance(v, (int, float))}}
    return {"model": str(path), "tasks": tasks, "limit": args.limit, "num_fewshot": args.num_fewshot,
            "lm_eval": lm_eval.__version__, "results": rows}


# ------------------------------------------------------------------------------------------------ ppl vs length

def read_text(path) -> str:
    path = Path(path)
    if path.suffix == ".jsonl":
        return "\n".join(row["text"] for row in read_jsonl(path))
    return path.read_text(encoding="utf-8")


def with_yarn(model, factor: float, original: int):
    """A copy of our model with YaRN RoPE scaling (`factor` over `original` positions) and its tables recomputed."""
    import copy

    from model import yarn_rope_parameters

    scaled = copy.deepcopy(model)
    scaled.config.rope_parameters = yarn_rope_parameters(factor, original, scaled.config.rope_theta)
    rotary = scaled.model.rotary_emb
    rotary.config = scaled.config
    rotary.cos, rotary.sin = rotary.compute_tables(max(rotary.cos.shape[0], int(original * factor)),
                                                   rotary.cos.device)
    return scaled


def perplexity(model, tokens, length: int, windows: int) -> tuple:
    """(perplexity, predicted tokens) over up to `windows` disjoint windows of `length` tokens from the start."""
    import torch
    import torch.nn.functional as F

    n = min(windows, len(tokens) // length)
    if n == 0:
        return None, 0
    ids = torch.tensor(tokens[:n * length]).view(n, length).to(next(model.parameters()).device)
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in ids:
            logits = model(input_ids=row[None]).logits[0, :-1].float()
            nll += float(F.cross_entropy(logits, row[1:], reduction="sum"))
            count += length - 1
    return math.exp(nll / count), count


def ppl_vs_len(args, engine, path) -> dict:
    lengths = sorted(int(x) for x in args.lengths.split(","))
    tokens = engine.tokenizer(read_text(args.ppl_vs_len), add_special_tokens=False)["input_ids"]
    model = engine.model
    yarn = None
    if getattr(model.config, "model_type", None) == "microlm" and max(lengths) > args.trained_len:
        yarn = with_yarn(model, max(lengths) / args.trained_len, args.trained_len)
    rows = []
    for length in lengths:
        plain, count = perplexity(model, tokens, length, args.windows)
        if plain is None:
            print(f"  {length}: the text has only {len(tokens)} tokens, skipped")
            continue
        row = {"length": length, "tokens": count, "ppl": plain,
               "ppl_yarn": perplexity(yarn, tokens, length, args.windows)[0] if yarn is not None else None}
        rows.append(row)
        yarn_text = f", YaRN {row['ppl_yarn']:.2f}" if row["ppl_yarn"] is not None else ""
        print(f"  {length:>6} tokens: perplexity {plain:.2f}{yarn_text} ({count} predicted tokens)", flush=True)
    result = {"model": str(path), "text": str(args.ppl_vs_len), "text_tokens": len(tokens),
              "trained_len": args.trained_len, "yarn_factor": max(lengths) / args.trained_len if yarn else None,
              "rows": rows}
    if rows:
        plot_ppl(result, Path(args.image))
    return result


def plot_ppl(result, image: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainer.tracking import save_figure

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([r["length"] for r in rows], [r["ppl"] for r in rows], "o-", label="RoPE as trained")
    if any(r["ppl_yarn"] is not None for r in rows):
        ax.plot([r["length"] for r in rows], [r["ppl_yarn"] for r in rows], "s-",
                label=f"YaRN, factor {result['yarn_factor']:g}")
    ax.axvline(result["trained_len"], color="gray", ls="--", lw=1, label=f"trained at {result['trained_len']}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"perplexity against context length: {Path(result['model']).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, image)
    print(f"plot: {image}")


# ------------------------------------------------------------------------------------------------------------- main

def markdown(result) -> str:
    lines = [f"{result['model']} (lm-eval {result['lm_eval']}, limit {result['limit']}, "
             f"{result['num_fewshot'] or 0}-shot)", "", "| task | metric | score |", "| --- | --- | --- |"]
    lines += [f"| {t} | {r['metric']} | {r['score']:.4f} |" for t, r in result["results"].items()]
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.download:  # read before datasets / huggingface_hub are imported
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from inference.load import load_engine
    from trainer import report

    engine, path = load_engine(args)
    if args.ppl_vs_len:
        result = ppl_vs_len(args, engine, path)
    else:
        result = run_tasks(args, engine, path)
        print(markdown(result))
        report.append(args.out_dir, {"kind": "benchmark", "model": str(path), "source": f"lm-eval, limit {args.limit}",
                                     "scores": {t: r["score"] for t, r in result["results"].items()}})
    out = Path(args.json or Path(args.out_dir) / "eval" / f"bench_{time.strftime('%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(f"-> {out}")
    return result


if __name__ == "__main__":
    main()
