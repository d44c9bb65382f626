"""Training and decoding speed on this machine: MiniMind's way (baseline) against ours, in the same run.

    python scripts/bench.py                                     # tiny + 26m training, 26m decoding
    python scripts/bench.py --presets tiny,26m,104m,moe-145m --repeats 3 --json scripts/results/bench_cpu.json
    python scripts/bench.py --modes baseline,ours,compiled      # add torch.compile to the comparison
    python scripts/bench.py --presets 104m,moe-145m --modes ours,ckpt --repeats 1 --decode_modes ""  # memory

What it measures, and how:
- the device's matmul roof, measured first: fp32 GEMM GFLOP/s and, where the device computes it natively, the fast
  dtype's (bf16 on CUDA and on CPUs with AVX512-BF16/AMX; square, best of several runs). A CPU without native bf16
  emulates it ~100x slower, so there ours trains and decodes in fp32 and the roof is fp32's;
- training, per preset and mode: step time, raw tokens/s (padding included), useful (non-pad) tokens/s, MFU of the
  useful tokens against the fast dtype's roof of this run (FLOPs per token 6·N_matmul + 12·L·d·T; MoE counts
  active experts), peak memory (process RSS on CPU, max_memory_allocated on CUDA). Rows imitate pretrain_hq.jsonl,
  whose texts are merged up to ~512 characters: documents of 250-400 tokens (uniform), at seq 512, batch --batch_size;
- modes: baseline = fp32, one document per row padded to 512, plain for-loop AdamW (MiniMind's pretraining);
  ours = documents packed into full rows (PretrainDataset's default), autocast to the fast dtype, fused AdamW (the
  engine's defaults, --dtype auto); compiled = ours + torch.compile; ckpt = ours + --grad_checkpoint (per-block
  recomputation: the memory column is the point); sft_padded / sft_packed = SFT batches of --batch_size chats of
  log-uniform length (32 to --seq_len tokens, the short ones far more common, as in SFT files), each padded to the
  batch's longest (--no_pack) or packed into rows of --seq_len (2-sft.py's default): useful tok/s and the useful
  fraction are the point (their × column compares with sft_padded). Every (preset, mode) runs in a fresh process,
  so its memory figure is its own; modes alternate, --repeats times, and the table shows medians;
- decoding (--decode_modes): new tokens/s at batch 1 and 8, 64-token prompt, 200 new tokens, with the KV cache:
  baseline = fp32 weights, transformers' generate() (as MiniMind decodes); ours = the inference core's decode loop
  (inference/, what chat, server, evaluation and rollouts use) in eval_model.py's --dtype auto (fp32 on a CPU,
  bf16 on a GPU); compiled = ours + static KV cache + torch.compile'd decode step (--compile); int8 = ours with int8 weight-only
  Linear layers (--quantize int8), its greedy tokens compared with ours'; int8+compiled = both; rollout = ours
  sampled at temperature 1, the path RL rollouts take (e.g. --decode_batches 32: 4 prompts x 8 generations); peak
  memory; and, per mode, the time one
  sweep of batch-1 products over every weight takes (the weight-read time per token: a decode step cannot beat it,
  so 1000 / it is that mode's batch-1 ceiling in tok/s).
The figures and the setup go to --json (device, torch version, threads, every number).
"""

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

from common.cli import HelpFormatter

DOC_TOKENS = (250, 400)  # pretrain_hq.jsonl: texts merged up to ~512 characters, 6400-vocab tokenizer
SFT_TOKENS = (32, 512)  # chat lengths of the SFT modes (log-uniform), cut at --seq_len


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def matmul_roof(device, dtype, n: int, runs: int = 5) -> float:
    """GFLOP/s of an n x n x n matmul, best of `runs` (after a warm-up)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 3
    best = float("inf")
    for i in range(runs + 1):
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        if i:  # the first run warms up
            best = min(best, (time.perf_counter() - t) / reps)
    return 2 * n**3 / best / 1e9


# ----------------------------------------------------------------------------------------------------------------------
# training

def make_batches(mode: str, n_batches: int, batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> list:
    """`n_batches` of {input_ids, labels}: one document per padded row (baseline) or documents packed (ours)."""
    g = torch.Generator().manual_seed(seed)
    docs = []

    def doc():
        n = int(torch.randint(DOC_TOKENS[0], DOC_TOKENS[1] + 1, (), generator=g))
        return torch.cat([torch.tensor([1]), torch.randint(10, vocab, (n - 2,), generator=g), torch.tensor([2])])

    rows = n_batches * batch_size
    if mode.startswith("sft"):  # chats of log-uniform length: short ones far more common than long ones
        from dataset import pack_collate, pad_collate

        lo, hi = math.log(SFT_TOKENS[0]), math.log(min(SFT_TOKENS[1], seq_len))
        chats = []
        for _ in range(rows):
            n = int(math.exp(lo + (hi - lo) * float(torch.rand((), generator=g))))
            ids = torch.randint(10, vocab, (n,), generator=g)
            chats.append({"input_ids": ids, "labels": ids})
        collate = (partial(pack_collate, max_seq_len=seq_len) if mode == "sft_packed" else pad_collate)
        return [collate(chats[i * batch_size:(i + 1) * batch_size]) for i in range(n_batches)]
    if mode == "baseline":
        input_ids = torch.zeros(rows, seq_len, dtype=torch.long)
        labels = torch.full((rows, seq_len), -100, dtype=torch.long)
        for r in range(rows):
            d = doc()[:seq_len]
            input_ids[r, :len(d)] = d
            labels[r, :len(d)] = d
    else:
        while sum(map(len, docs)) < rows * seq_len:
            docs.append(doc())
        input_ids = torch.cat(docs)[:rows * seq_len].view(rows, seq_len)
        labels = input_ids.clone()
    return [{"input_ids": input_ids[i::n_batches][:batch_size], "labels": labels[i::n_batches][:batch_size]}
            for i in range(n_batches)]


def train_child(spec: dict) -> dict:
    from model import MicroLMConfig, MicroLMForCausalLM
    from common.distributed import fast_dtype
    from common.distributed import to_device
    from trainer.engine import lm_loss, param_groups

    device = torch.device(spec["device"])
    mode = spec["mode"]
    torch.manual_seed(0)
    model = MicroLMForCausalLM(MicroLMConfig.from_preset(spec["preset"])).to(device).train()
    if mode == "ckpt":  # as the engine does for --grad_checkpoint
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    T, B = spec["seq_len"], spec["batch_size"]
    warmup = 3 if mode == "compiled" else 2
    batches = [to_device(b, device) for b in make_batches(mode, warmup + spec["steps"], B, T,
                                                          model.config.vocab_size)]
    fused = mode != "baseline"
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4, betas=(0.9, 0.95),
                                  fused=fused, foreach=False if not fused else None)
    dtype = torch.float32 if mode == "baseline" else fast_dtype(device)  # the engine's --dtype auto
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    net = torch.compile(model) if mode == "compiled" else model
    times, losses = [], []
    for i, batch in enumerate(batches):
        sync(device)
        t = time.perf_counter()
        with autocast:
            loss_sum, _ = lm_loss(net, batch)
        loss = loss_sum / (batch["labels"][:, 1:] != -100).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
            losses.append(loss.item())
    step = statistics.median(times)
    useful = statistics.mean(int((b["labels"] != -100).sum()) for b in batches[warmup:])
    raw = statistics.mean(b["input_ids"].numel() for b in batches[warmup:])  # SFT batches vary in shape
    return {"step_s": step, "raw_tokens_per_s": raw / step, "useful_tokens_per_s": useful / step,
            "useful_fraction": useful / raw, "flops_per_token": model.flops_per_token(T),
            "peak_memory_mib": peak_memory_mib(device), "loss_first": losses[0], "loss_last": losses[-1]}


# ----------------------------------------------------------------------------------------------------------------------
# decoding

def weight_read_ms(model, device, runs: int = 7) -> float:
    """One batch-1 product with every Linear weight in model order (what a decode step cannot avoid), median ms."""
    from inference.quant import Int8Linear

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
    dtype = next(model.parameters()).dtype
    xs = [torch.ones(1, m.in_features, device=device, dtype=dtype) for m in layers]
    times = []
    with torch.no_grad():
        for i in range(runs + 1):
            sync(device)
            t = time.perf_counter()
            for m, x in zip(layers, xs):
                m(x)
            sync(device)
            if i:
                times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def decode_child(spec: dict) -> dict:
    from inference import Sampling, generate
    from inference.quant import quantize_int8
    from model import MicroLMConfig, MicroLMForCausalLM
    from common.distributed import decode_dtype

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = MicroLMForCausalLM(MicroLMConfig.from_preset(spec["preset"])).to(device).eval()
    B, prompt, new = spec["batch_size"], spec["prompt_tokens"], spec["new_tokens"]
    ids = torch.randint(10, model.config.vocab_size, (B, prompt), device=device)
    if spec["mode"] != "baseline":
        model = model.to(decode_dtype(device))  # eval_model.py's --dtype auto
    if "int8" in spec["mode"]:
        try:
            quantize_int8(model)
        except ValueError as e:  # no int8 kernel for this device in this torch build: a row that says so
            return {"skipped": str(e)}
    step = torch.compile(model, dynamic=False) if "compiled" in spec["mode"] else None
    times = []
    with torch.no_grad():
        for i in range(spec["runs"] + 1):
            sync(device)
            t = time.perf_counter()
            if spec["mode"] == "baseline":  # transformers' generate() in fp32, as MiniMind decodes
                out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                     pad_token_id=0)[:, prompt:]
            else:  # the inference core's loop; compiled: a fresh static cache per run (as each request gets);
                # rollout: sampled at temperature 1, as GRPO / PPO / agent rollouts are (no eos: every row runs on)
                sampling = Sampling(max_new_tokens=new, temperature=1.0 if spec["mode"] == "rollout" else 0.0)
                out = generate(model, ids, sampling=sampling, static_cache=step is not None,
                               cache_len=256 * -(-(prompt + new) // 256), step=step)
            sync(device)
            if i:  # the first run warms up (and compiles)
                times.append(time.perf_counter() - t)
    assert out.shape == (B, new)
    seconds = statistics.median(times)
    return {"seconds": seconds, "tokens_per_s": B * new / seconds, "peak_memory_mib": peak_memory_mib(device),
            "weight_read_ms": weight_read_ms(model, device), "tokens": out.tolist()}


# ----------------------------------------------------------------------------------------------------------------------

def run_child(kind: str, spec: dict) -> dict:
    """One measurement in a fresh interpreter: its own peak memory, no state from the previous mode."""
    proc = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(spec)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode:
        raise RuntimeError(f"{kind} {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--presets", default="tiny,26m", help="training presets (CUDA: try tiny,26m,104m,moe-145m)")
    parser.add_argument("--modes", default="baseline,ours", help="training: baseline, ours, compiled, ckpt, sft_padded, sft_packed")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (after the warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each mode")
    parser.add_argument("--decode_preset", default="26m", help="'' to skip decoding")
    parser.add_argument("--decode_batches", default="1,8")
    parser.add_argument("--decode_modes", default="baseline,ours,int8",
                        help="baseline, ours, compiled, int8, int8+compiled, rollout (ours, sampled: RL rollouts)")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1")
    parser.add_argument("--json", default="out/bench/bench.json")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, spec = args.child
        print(json.dumps((train_child if kind == "train" else decode_child)(json.loads(spec))))
        return None

    from common.distributed import fast_dtype, pick_device

    device = pick_device(args.device)
    args.device = str(device)
    n = 8192 if device.type == "cuda" else 2048
    fast = str(fast_dtype(device)).replace("torch.", "").replace("bfloat16", "bf16").replace("float", "fp")
    roof = {"fp32": matmul_roof(device, torch.float32, n)}
    if fast != "fp32":  # only a dtype the device computes natively: emulated bf16 would take minutes to measure
        roof[fast] = matmul_roof(device, fast_dtype(device), n)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        roof["tf32"] = matmul_roof(device, torch.float32, n)
    result = {"fast_dtype": fast, "device": device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "matmul_gflops": roof, "matmul_size": n, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "doc_tokens": list(DOC_TOKENS), "steps": args.steps, "repeats": args.repeats, "train": [],
              "decode": []}
    print(f"{result['device']}, torch {torch.__version__}, {result['threads']} threads; matmul roof "
          + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in roof.items()), flush=True)

    modes = args.modes.split(",")
    for preset in filter(None, args.presets.split(",")):
        runs = {m: [] for m in modes}
        for r in range(args.repeats):
            for mode in modes if r % 2 == 0 else modes[::-1]:  # alternate the order too
                spec = {"preset": preset, "mode": mode, "device": args.device, "batch_size": args.batch_size,
                        "seq_len": args.seq_len, "steps": args.steps}
                runs[mode].append(run_child("train", spec))
                print(f"  {preset} {mode} run {r + 1}: {runs[mode][-1]['useful_tokens_per_s']:,.0f} useful tok/s",
                      flush=True)
        for mode in modes:
            med = {k: statistics.median(x[k] for x in runs[mode]) for k in runs[mode][0]}
            med["mfu"] = med["useful_tokens_per_s"] * med["flops_per_token"] / (roof[fast] * 1e9)
            result["train"].append({"preset": preset, "mode": mode, **med, "runs": runs[mode]})

    if args.decode_preset:
        run_decode(args, result)

    print_tables(result)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.json}")
    return result


def run_decode(args, result):
    """Each decode mode at each batch size, in child processes; rows (or skipped rows) go into result."""
    for batch in map(int, args.decode_batches.split(",")):
        for mode in filter(None, args.decode_modes.split(",")):
            spec = {"preset": args.decode_preset, "mode": mode, "device": args.device, "batch_size": batch,
                    "prompt_tokens": 64, "new_tokens": 200, "runs": 3}
            try:
                row = {"preset": args.decode_preset, "mode": mode, "batch_size": batch,
                       **run_child("decode", spec)}
            except RuntimeError as e:  # one failing mode costs its row, not the rows measured after it
                print(f"  decode {mode} batch {batch} FAILED: {str(e)[-600:]}", flush=True)
                row = {"preset": args.decode_preset, "mode": mode, "batch_size": batch, "skipped": str(e)[-600:]}
            if "skipped" in row:
                print(f"  decode {mode} batch {batch} skipped: {row['skipped']}", flush=True)
                result.setdefault("skipped", []).append(row)
                continue
            ours = next((r for r in result["decode"] if r["mode"] == "ours" and r["batch_size"] == batch), None)
            if "int8" in mode and ours:  # same prompt, greedy: the share of tokens equal to ours, position-wise
                pairs = [(a, b) for x, y in zip(row["tokens"], ours["tokens"]) for a, b in zip(x, y)]
                row["agreement_with_ours"] = sum(a == b for a, b in pairs) / len(pairs)
            result["decode"].append(row)
            print(f"  decode {args.decode_preset} {mode} batch {batch}: {row['tokens_per_s']:,.0f} tok/s",
                  flush=True)
    for row in result["decode"]:
        row.pop("tokens")


def print_tables(result):
    print(f"\n{result['device']}, torch {result['torch']}, {result['threads']} threads; matmul roof "
          + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in result["matmul_gflops"].items()))
    print(f"training: batch {result['batch_size']} x seq {result['seq_len']}, documents of "
          f"{result['doc_tokens'][0]}-{result['doc_tokens'][1]} tokens, median of {result['repeats']} runs\n")
    print(f"| preset | mode | step s | raw tok/s | useful tok/s | useful × baseline | MFU ({result['fast_dtype']} roof)"
          " | peak MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    # SFT modes against padded SFT batches, the others against the baseline
    base = {(r["preset"], r["mode"]): r["useful_tokens_per_s"] for r in result["train"]}
    for r in result["train"]:
        ref = base.get((r["preset"], "sft_padded" if r["mode"].startswith("sft") else "baseline"))
        ratio = f"{r['useful_tokens_per_s'] / ref:.2f}×" if ref else "–"
        print(f"| {r['preset']} | {r['mode']} | {r['step_s']:.3f} | {r['raw_tokens_per_s']:,.0f} | "
              f"{r['useful_tokens_per_s']:,.0f} | {ratio} | {r['mfu']:.1%} | {r['peak_memory_mib']:,.0f} |")
    if result["decode"]:
        print("\n| decode preset | mode | batch | new tok/s | × baseline | weight read ms/token (ceiling tok/s) | "
              "peak MiB |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        base = {r["batch_size"]: r["tokens_per_s"] for r in result["decode"] if r["mode"] == "baseline"}
        for r in result["decode"]:
            ratio = f"{r['tokens_per_s'] / base[r['batch_size']]:.2f}×" if r["batch_size"] in base else "–"
            agree = f" (greedy = ours: {r['agreement_with_ours']:.0%})" if "agreement_with_ours" in r else ""
            print(f"| {r['preset']} | {r['mode']}{agree} | {r['batch_size']} | {r['tokens_per_s']:,.0f} | "
                  f"{ratio} | {r['weight_read_ms']:.1f} ({1000 / r['weight_read_ms']:,.0f}) | "
                  f"{r['peak_memory_mib']:,.0f} |")


if __name__ == "__main__":
    main()
