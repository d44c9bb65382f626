"""Memory per parameter and per GPU, measured: the same pretraining run with each --optim, and the planner beside it.

    python scripts/bench_memory.py                                        # CPU: tiny preset, demo text, 200 steps
    python scripts/bench_memory.py --device cuda --preset 104m --seq_len 512 --batch_size 16 --steps 30

For every optimizer: the bytes per parameter of the trained weights, their gradients and the optimizer state (what
rank 0 holds after the first step, trainer/optim.py), the loss every step (one figure, the same data in the same
order), and scripts/plan_memory.py's figures for the same settings. On CUDA also the peak allocated memory against
the planner's total without its runtime estimate (the CUDA context is outside the allocator). Writes a JSON file
and the figure.
"""

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from common.cli import HelpFormatter
from demo.run import load_script
from model import MicroLMConfig, MicroLMForCausalLM
from scripts.plan_memory import plan
from trainer.optim import OPTIMIZERS

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("weights", "gradients", "optimizer")


def run(args) -> dict:
    pretrain = load_script("1-pretrain.py")
    config = MicroLMConfig.from_preset(args.preset)
    results = {"machine": cpu_name(), "device": args.device, "preset": args.preset,
               "steps": args.steps, "seq_len": args.seq_len, "batch_size": args.batch_size, "runs": {}}
    if args.device.startswith("cuda"):
        results["machine"] = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp:
        for optim in args.optims.split(","):
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            summary = pretrain.main([
                "--data_path", str(args.data), "--out_dir", f"{tmp}/{optim}", "--image_dir", f"{tmp}/images",
                "--preset", args.preset, "--device", args.device, "--dtype", args.dtype, "--optim", optim,
                "--max_seq_len", str(args.seq_len), "--batch_size", str(args.batch_size), "--max_steps",
                str(args.steps), "--learning_rate", str(args.learning_rate), "--save_interval", str(10 ** 9),
                "--log_interval", "1", "--num_workers", "0", *(["--grad_checkpoint"] if args.grad_checkpoint else [])])
            params = sum(p.numel() for p in _meta(config).parameters())
            planned = plan(config, args.seq_len, args.batch_size, optim=optim, dtype=args.dtype,
                           grad_checkpoint=args.grad_checkpoint, cuda=False)
            entry = {"bytes_per_parameter": {k: summary["memory"][k] / params for k in PARTS},
                     "planned_bytes_per_parameter": {k: planned[k] / params for k in PARTS},
                     "history": summary["history"], "last_loss": summary["last_loss"],
                     "seconds": summary["seconds"]}
            if args.device.startswith("cuda"):
                entry["peak_bytes"] = torch.cuda.max_memory_allocated()
                entry["planned_bytes"] = sum(planned.values())
            results["runs"][optim] = entry
    return results


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _meta(config):
    with torch.device("meta"):
        return MicroLMForCausalLM(config)


def figure(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, diff) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
    base = dict(results["runs"].get("adamw", {}).get("history", []))
    for i, (optim, r) in enumerate(results["runs"].items()):
        per = sum(r["bytes_per_parameter"].values())
        steps, losses = zip(*r["history"])
        ax.plot(steps, losses, label=f"{optim} ({per:.1f} B/param, last {r['last_loss']:.3f})", lw=1, color=f"C{i}")
        if base and optim != "adamw":
            diff.plot(steps, [v - base[s] for s, v in zip(steps, losses)], label=optim, lw=1, color=f"C{i}")
    ax.set_ylabel("training loss")
    ax.set_title(f"{results['preset']} preset, {results['steps']} steps, {results['machine']}, {results['device']}",
                 fontsize=9)
    ax.legend()
    diff.axhline(0, color="grey", lw=0.5)
    diff.set_ylabel("loss - adamw's")
    diff.set_xlabel("step")
    diff.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--preset", default="tiny",
                   help="model size (a CPU without native bf16 emulates adamw_bf16's matrix products: slow)")
    p.add_argument("--data", default=str(ROOT / "demo" / "data" / "pretrain.jsonl"), help="pretraining jsonl")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--optims", default=",".join(OPTIMIZERS), help="comma-separated --optim values")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--grad_checkpoint", action="store_true")
    p.add_argument("--json", default="scripts/results/bench_memory_cpu.json", help="results file")
    p.add_argument("--figure", default="images/optimizers_loss.png", help="loss curves")
    args = p.parse_args(argv)
    results = run(args)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    figure(results, args.figure)
    print("| optim | weights | gradients | optimizer | total B/param (planned) | last loss | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for optim, r in results["runs"].items():
        b, pl = r["bytes_per_parameter"], r["planned_bytes_per_parameter"]
        print(f"| {optim} | {b['weights']:.2f} | {b['gradients']:.2f} | {b['optimizer']:.2f} | "
              f"{sum(b.values()):.2f} ({sum(pl.values()):.2f}) | {r['last_loss']:.3f} | {r['seconds']:.0f} |"
              + (f" peak {r['peak_bytes'] / 2**30:.2f} GiB, planned {r['planned_bytes'] / 2**30:.2f} GiB"
                 if "peak_bytes" in r else ""))
    return results


if __name__ == "__main__":
    main()
