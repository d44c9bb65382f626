"""Training throughput of the real stage scripts: tokens/s and model FLOPs utilisation (MFU) per stage.

    python scripts/bench_stages.py                                   # 26m preset, stages 1-4, 30 steps each
    python scripts/bench_stages.py --preset 104m --stages pretrain --steps 50 --extra "--compile"

Each stage runs its own script (so the numbers are what a user gets) with its default batch size and sequence
length on the demo data, for `--steps` optimizer steps, chained like the real pipeline (sft starts from the pretrain
it just made, and so on). Throughput counts every token fed to the model (padding included) and skips the first
step (start-up, compilation). MFU = achieved model FLOPs / the accelerator's peak dense bf16 FLOPs, with the usual
estimate of 6·N + 12·L·d·T FLOPs per token for the forward and backward pass (N: non-embedding parameters plus the
output head, L layers, d hidden size, T sequence length). Writes a JSON file and prints a Markdown table.
"""

import argparse
import json
import platform
import shlex
import tempfile
from pathlib import Path

import torch

from common.cli import HelpFormatter
from demo.run import load_script
from model import MicroLMConfig, MicroLMForCausalLM

ROOT = Path(__file__).resolve().parents[1]

DEMO = ROOT / "demo" / "data"
STAGES = {  # stage -> (script, demo data, the stage it starts from)
    "pretrain": ("1-pretrain.py", "pretrain.jsonl", None),
    "sft": ("2-sft.py", "sft.jsonl", "pretrain"),
    "kd": ("3-KD.py", "kd.jsonl", "sft"),
    "dpo": ("4-RLHF.py", "dpo.jsonl", "kd"),
}
# peak dense bf16 tensor FLOP/s (no sparsity) of accelerators our users have; --peak_tflops overrides
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "4090": 165.2, "3090": 71.0, "L40S": 362.0,
               "A10": 125.0}


def peak_flops(device_name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for key, tflops in PEAK_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--preset", default="26m")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--extra", default="", help="more arguments for every stage script, e.g. \"--compile\"")
    parser.add_argument("--peak_tflops", type=float, default=None, help="peak bf16 TFLOP/s if not detected")
    parser.add_argument("--out", default="out/bench/stages.json")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    peak = peak_flops(device_name, args.peak_tflops) if device == "cuda" else args.peak_tflops
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages.split(","):
            script, data, start = STAGES[stage]
            module = load_script(script)
            argv = ["--data_path", str(DEMO / data), "--out_dir", tmp, "--image_dir", tmp, "--max_steps",
                    str(args.steps), "--epochs", "1000", "--log_interval", "10", "--save_interval", "1000000",
                    *shlex.split(args.extra)]
            argv += ["--from", start] if start else ["--preset", args.preset]
            if stage == "dpo":
                argv.append("--precompute_ref")
            parsed = module.build_parser().parse_args(argv)
            summary = module.main(argv)
            config = MicroLMConfig.from_pretrained(Path(tmp) / stage)
            tok_s = summary["tokens_per_s_after_first_step"]
            with torch.device("meta"):
                per_token = MicroLMForCausalLM(config).flops_per_token(parsed.max_seq_len)
            achieved = tok_s * per_token if tok_s else None
            rows.append({"stage": stage, "preset": args.preset, "batch_size": parsed.batch_size,
                         "accumulation_steps": parsed.accumulation_steps, "max_seq_len": parsed.max_seq_len,
                         "dtype": parsed.dtype, "steps": summary["steps"], "tokens_per_s": tok_s,
                         "tflops": achieved / 1e12 if achieved else None,
                         "mfu": achieved / peak if achieved and peak else None,
                         "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
                         "extra": args.extra})
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
    result = {"device": device_name, "torch": torch.__version__, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{device_name}, torch {torch.__version__}")
    print("| stage | preset | batch × seq | tokens/s | TFLOP/s | MFU | peak mem GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        def fmt(v, spec):
            return format(v, spec) if v is not None else "–"
        print(f"| {r['stage']} | {r['preset']} | {r['batch_size']} × {r['max_seq_len']} | {fmt(r['tokens_per_s'], ',.0f')} "
              f"| {fmt(r['tflops'], '.1f')} | {fmt(r['mfu'], '.1%')} | {fmt(r['peak_memory_gib'], '.1f')} |")
    return result


if __name__ == "__main__":
    main()
