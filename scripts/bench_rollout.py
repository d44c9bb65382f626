"""Rollout throughput: the same prompts sampled by the local engine (the inference core's decode loop in the
trainer's process) and by a vLLM server (trainer/rollout.py), at the same batch sizes, lengths and temperature.

    python scripts/bench_rollout.py                                   # CPU: 26m preset, random weights
    python scripts/bench_rollout.py --device cuda --preset 104m --batch_sizes 1,32,128

The model is a fresh `--preset` (random weights: replies run to --max_new_tokens, so both engines generate the same
number of tokens) or `--from` a checkpoint. vLLM is started as `--rollout_engine vllm` starts it (its Python from
$LLM_VLLM_PYTHON or scripts/setup_vllm.sh's venv), once, and its start-up is not timed; each figure is the best of
--repeats. Writes scripts/results/bench_rollout_<device>.json.
"""

import argparse
import json
import tempfile
import time
import types
from pathlib import Path

import torch
from transformers import AutoTokenizer

from common.cli import HelpFormatter
from dataset import PromptDataset, prompt_collate
from inference import Sampling
from model import TOKENIZER_DIR, MicroLMConfig, MicroLMForCausalLM
from model.families import load_pretrained
from scripts.bench_memory import cpu_name
from trainer import rollout

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats):
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = fn()
        seconds = time.perf_counter() - t0
        if best is None or tokens / seconds > best[0] / best[1]:
            best = (tokens, seconds)
    return {"tokens": best[0], "seconds": best[1], "tokens_per_s": best[0] / best[1]}


def run(args) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    dtype = getattr(torch, args.dtype)
    if args.init_from:
        model = load_pretrained(args.init_from)
    else:
        torch.manual_seed(0)
        model = MicroLMForCausalLM(MicroLMConfig.from_preset(args.preset))
    model.to(args.device, dtype).eval()
    data = PromptDataset(args.data, tokenizer, 128)
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=1.0)
    results = {"machine": torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name(),
               "device": args.device, "model": args.init_from or args.preset, "dtype": args.dtype,
               "parameters": sum(p.numel() for p in model.parameters()), "max_new_tokens": args.max_new_tokens,
               "threads": torch.get_num_threads(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = rollout.standalone(tokenizer, tmp, args.device, dtype)
        engine_args = types.SimpleNamespace(rollout_url=args.rollout_url, vllm_python=None, vllm_args=args.vllm_args,
                                            weight_sync="disk", sync_every=1, tis_cap=2.0, rollout_timeout=1800,
                                            max_seq_len=512, max_prompt_len=128, max_new_tokens=args.max_new_tokens)
        engines = {"local": rollout.LocalEngine(trainer), "vllm": rollout.VLLMEngine(engine_args, trainer, model)}
        try:
            engines["vllm"].maybe_sync(model)  # the weights this run measures, whichever server it is
            for batch_size in map(int, args.batch_sizes.split(",")):
                batch = prompt_collate([data[i] for i in range(batch_size)], pad_id=tokenizer.pad_token_id)
                ids, mask = batch["prompt_ids"].to(args.device), batch["prompt_mask"].to(args.device)
                for name, engine in engines.items():
                    def once():
                        with torch.no_grad():
                            return int(engine.sample(model, ids, mask, sampling)[1].sum())
                    once()  # warm-up
                    results["runs"].append({"engine": name, "batch_size": batch_size,
                                            **timed(once, args.repeats)})
                    print(results["runs"][-1], flush=True)
        finally:
            engines["vllm"].close()
    local = {r["batch_size"]: r["tokens_per_s"] for r in results["runs"] if r["engine"] == "local"}
    for r in results["runs"]:
        if r["engine"] == "vllm":
            r["speedup_vs_local"] = r["tokens_per_s"] / local[r["batch_size"]]
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--preset", default="26m")
    parser.add_argument("--from", dest="init_from", default=None, help="a checkpoint instead of a fresh --preset")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--data", default=str(ROOT / "demo" / "data" / "reason_prompts.jsonl"))
    parser.add_argument("--batch_sizes", default="1,32")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rollout_url", default=None, help="a running vLLM server instead of starting one")
    parser.add_argument("--vllm_args", default="", help="more arguments for the started server")
    parser.add_argument("--out", default=None, help="default: scripts/results/bench_rollout_<device>.json")
    args = parser.parse_args(argv)
    results = run(args)
    out = Path(args.out or ROOT / "scripts" / "results" / f"bench_rollout_{args.device.split(':')[0]}.json")
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
