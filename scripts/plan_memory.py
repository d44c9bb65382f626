"""Per-GPU memory of a training run, by part, and whether it fits; if not, the settings that make it fit.

    python scripts/plan_memory.py --model qwen3-1.7b --seq_len 1024 --batch_size 4 --gpus 4 --gpu_mem 24 --fsdp
    python scripts/plan_memory.py --model out/sft --seq_len 512 --batch_size 16 --reference   # DPO / GRPO / PPO

--model: one of our presets (26m, 104m, ...), a released shape (qwen3-0.6b, qwen3-1.7b, qwen2.5-0.5b, qwen2.5-1.5b,
llama-3.2-1b), or a folder with a config.json (ours, MiniMind's or a stock Llama / Qwen2 / Qwen3 / Mixtral one: only
the config is read). The parts, per GPU:

- weights, gradients: every trained parameter (fp32, or bf16 with --optim adamw_bf16); 1/N of each with --fsdp
  (rank 0's shard: FSDP splits dim 0 into N equal pieces, the last ones shorter).
- optimizer: AdamW's two moments per parameter as trainer/optim.py keeps them (8-bit: codes + a scale per 256).
- gathered: what exists whole besides: --fsdp, the root unit (embeddings, head, final norm) for the whole step and
  two blocks in flight (one computing, one prefetched) in the compute dtype, plus one block's whole fp32 gradient
  before its reduce-scatter; without it, autocast's bf16 copy of the weights, and DDP's gradient buckets.
- activations: what autograd saves per token in each block (counted tensor by tensor from the model's forward; the
  tests check it against the tensors a CPU forward saves), or with --grad_checkpoint one tensor per block plus one
  block's worth while it is recomputed.
- logits: the fp32 log-softmax saved for the loss and its gradient (in chunks of 2^26 for vocabularies from 32,768,
  which are recomputed in the backward pass and never whole).
- reference: a frozen copy in the compute dtype (DPO / GRPO / PPO's reference, KD's teacher of the same size).
- runtime: the CUDA context, cuBLAS workspaces and allocator slack: 1 GiB + 5% of the rest (an estimate).
"""

import argparse
import json
import math
from pathlib import Path

import torch

from common.cli import HelpFormatter
from model import MicroLMConfig, MicroLMForCausalLM
from model.model import LARGE_VOCAB, LOSS_CHUNK_ELEMENTS
from trainer.optim import OPTIMIZERS, state_bytes_per_tensor, weight_dtype

GiB = 2 ** 30
# released models' shapes (their config.json), so a plan needs no download
RELEASED = {
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=3072, vocab_size=151936, qk_norm=True,
                       tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=6144, vocab_size=151936, qk_norm=True,
                       tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, attention_bias=True, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936, attention_bias=True, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
}
PARTS = ("weights", "gradients", "optimizer", "gathered", "activations", "logits", "reference", "runtime")


def load_config(model: str) -> MicroLMConfig:
    if model.lower() in RELEASED:
        return MicroLMConfig(**RELEASED[model.lower()])
    path = Path(model)
    if (path / "config.json").exists():
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if cfg.get("model_type") == "microlm":
            return MicroLMConfig.from_pretrained(path)
        from transformers import AutoConfig

        from model.families import config_from_minimind, config_from_stock
        if cfg.get("model_type") in ("minimind", None):
            return config_from_minimind(cfg, {}, str(path))
        return config_from_stock(AutoConfig.from_pretrained(path), str(path))
    return MicroLMConfig.from_preset(model)


def parameter_shapes(config: MicroLMConfig) -> dict:
    """name -> shape of every parameter (a tied head once), from the model built on the meta device."""
    with torch.device("meta"):
        model = MicroLMForCausalLM(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def shard_numel(shape, gpus: int) -> int:
    """Rank 0's share of a tensor FSDP splits along dim 0."""
    rest = math.prod(shape[1:])
    return math.ceil(shape[0] / gpus) * rest


def block_activation_elements(c: MicroLMConfig) -> dict:
    """Elements autograd saves per token in one decoder block, by dtype class: `residual` (the stream and the norms'
    inverse RMS, fp32 under autocast), `compute` (matmul inputs and outputs), `float32` (softmax statistics,
    the router's probabilities), `int64` (the router's choices)."""
    h, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    compute = 2 * h + 3 * q + 2 * kv  # two normed inputs; q, attention out, its o_proj input; k, v
    if c.use_moe:
        k, i = c.num_experts_per_tok, c.intermediate_size
        compute += k * (2 * h + 4 * i) + c.n_shared_experts * (4 * i + h) + 2 * h
        return {"residual": 2 * h + 2, "compute": compute,
                "float32": c.num_attention_heads + (2 + k) * c.num_experts, "int64": 3 * k}
    compute += h + 4 * c.intermediate_size  # the FFN's input view, gate, act(gate), up and their product
    return {"residual": 2 * h + 2, "compute": compute, "float32": c.num_attention_heads, "int64": 0}


def block_activation_bytes(c: MicroLMConfig, r: int, b: int) -> int:
    """Bytes one block saves per token with an r-byte residual stream and b-byte compute."""
    per = block_activation_elements(c)
    autocast_norms = r == 4 and b == 2  # an fp32 stream's norms save their fp32 output beside the matmul's bf16 copy
    return (per["residual"] * r + per["compute"] * b + per["float32"] * 4 + per["int64"] * 8
            + 2 * c.hidden_size * 4 * autocast_norms)


def chunked_loss(vocab: int, positions: int) -> bool:
    """model.token_cross_entropy's choice: chunks (recomputed, never all saved) for a large vocabulary."""
    return vocab >= LARGE_VOCAB and positions > max(1, LOSS_CHUNK_ELEMENTS // vocab)


def plan(config: MicroLMConfig, seq_len: int, batch_size: int, gpus: int = 1, fsdp: bool = False,
         grad_checkpoint: bool = False, optim: str = "adamw", dtype: str = "bfloat16", reference: bool = False,
         cuda: bool = True) -> dict:
    """Bytes per GPU by part (PARTS); `cuda=False` leaves out the runtime (a CPU run has none)."""
    shapes = parameter_shapes(config)
    n = gpus if fsdp else 1
    w = torch.finfo(weight_dtype(optim)).bits // 8
    b = 2 if dtype in ("bfloat16", "float16") or optim == "adamw_bf16" else 4
    # the residual stream stays fp32 under autocast; in bf16 when the weights (or FSDP's gathered copies) are
    r = 4 if b == 4 or (not fsdp and optim != "adamw_bf16") else 2
    local = {name: shard_numel(s, n) if fsdp else math.prod(s) for name, s in shapes.items()}
    total = sum(math.prod(s) for s in shapes.values())
    parts = dict.fromkeys(PARTS, 0)
    parts["weights"] = parts["gradients"] = w * sum(local.values())
    parts["optimizer"] = sum(state_bytes_per_tensor(optim, numel, "embed_tokens" in name)
                             for name, numel in local.items())
    block = {}
    for name, s in shapes.items():
        if ".layers.0." in name:
            block[name] = math.prod(s)
    block_numel = sum(block.values())
    root_numel = total - block_numel * config.num_hidden_layers
    if fsdp:
        parts["gathered"] = b * (root_numel + 2 * block_numel) + 4 * block_numel if gpus > 1 else 0
    else:
        matmul = sum(math.prod(s) for s in shapes.values() if len(s) == 2)
        parts["gathered"] = (2 * matmul if b == 2 and optim != "adamw_bf16" else 0) + \
            (parts["gradients"] if gpus > 1 else 0)  # autocast's weight copies; DDP's buckets
    tokens = batch_size * seq_len
    per_block = block_activation_bytes(config, r, b)
    h, vocab = config.hidden_size, config.vocab_size
    if grad_checkpoint:  # each block's input kept, one block's activations while it is recomputed
        parts["activations"] = tokens * (config.num_hidden_layers * h * r + per_block)
    else:
        parts["activations"] = tokens * config.num_hidden_layers * per_block
    final_norm_fp32 = 4 * h if r == 4 and b == 2 else 0  # as in a block: its fp32 output beside the bf16 copy
    parts["activations"] += tokens * ((2 * h + 1) * r + h * b + final_norm_fp32)  # final norm, head input
    positions = batch_size * (seq_len - 1)
    if chunked_loss(vocab, positions):
        chunk = LOSS_CHUNK_ELEMENTS // vocab * vocab
        parts["logits"] = chunk * (4 + 4 + b) + positions * 8
    else:  # saved log-softmax, its gradient, (under autocast) the head's bf16 output; the labels
        parts["logits"] = positions * vocab * (4 + 4 + (b if b == 2 else 0)) + positions * 8
    if reference:
        parts["reference"] = b * total
    if cuda:
        parts["runtime"] = GiB + 0.05 * sum(parts.values())
    return parts


def saved_bytes(config: MicroLMConfig, seq_len: int, batch_size: int, grad_checkpoint: bool = False) -> int:
    """What the plan says autograd holds at the end of an fp32 forward: the activations and the saved log-softmax
    (the quantity a CPU forward's saved tensors are measured against)."""
    parts = plan(config, seq_len, batch_size, grad_checkpoint=grad_checkpoint, dtype="float32", cuda=False)
    positions = batch_size * (seq_len - 1)
    if chunked_loss(config.vocab_size, positions):
        return parts["activations"] + positions * 8
    # the block being recomputed exists only in the backward pass, not at the end of the forward
    recompute = batch_size * seq_len * block_activation_bytes(config, 4, 4) if grad_checkpoint else 0
    return parts["activations"] - recompute + positions * (4 * config.vocab_size + 8)


OPTIONS = [  # what to try, cheapest in speed first
    ("--grad_checkpoint", dict(grad_checkpoint=True)),
    ("--optim adamw8bit", dict(optim="adamw8bit")),
    ("--fsdp", dict(fsdp=True)),
    ("--fsdp --grad_checkpoint", dict(fsdp=True, grad_checkpoint=True)),
    ("--fsdp --optim adamw8bit", dict(fsdp=True, optim="adamw8bit")),
    ("--fsdp --grad_checkpoint --optim adamw8bit", dict(fsdp=True, grad_checkpoint=True, optim="adamw8bit")),
    ("--grad_checkpoint --optim adamw8bit", dict(grad_checkpoint=True, optim="adamw8bit")),
    ("--grad_checkpoint --optim adamw_bf16", dict(grad_checkpoint=True, optim="adamw_bf16")),
    ("--fsdp --grad_checkpoint --optim adamw_bf16", dict(fsdp=True, grad_checkpoint=True, optim="adamw_bf16")),
]


def suggestions(config, settings: dict, gpu_mem: float, limit: int = 3) -> list:
    """(flags, bytes) that fit, at most `limit`: the options above (FSDP only with several GPUs) at the largest
    micro-batch, halved until something fits (--accumulation_steps times more keeps the global batch)."""
    batch = settings["batch_size"]
    while batch >= 1:
        found = []
        for flags, change in [("", {}), *OPTIONS]:
            if change.get("fsdp") and settings["gpus"] == 1:
                continue
            need = sum(plan(config, **{**settings, **change, "batch_size": batch}).values())
            if need <= gpu_mem * GiB:
                if batch < settings["batch_size"]:
                    flags += f" --batch_size {batch} (--accumulation_steps x{settings['batch_size'] // batch})"
                found.append((flags.strip(), need))
        if found:
            return found[:limit]
        batch //= 2
    return []


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="26m", help="preset, released shape or folder with a config.json")
    p.add_argument("--seq_len", type=int, default=512, help="tokens per row (--max_seq_len)")
    p.add_argument("--batch_size", type=int, default=8, help="micro-batch per GPU")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (ranks) the run shards over with --fsdp")
    p.add_argument("--gpu_mem", type=float, default=24, help="GiB per GPU")
    p.add_argument("--fsdp", action="store_true", help="weights, gradients and optimizer state sharded")
    p.add_argument("--grad_checkpoint", action="store_true", help="activations recomputed per block")
    p.add_argument("--optim", default="adamw", choices=OPTIMIZERS, help="the training scripts' --optim")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="compute dtype")
    p.add_argument("--reference", action="store_true", help="a frozen reference / teacher of the same size")
    p.add_argument("--json", action="store_true", help="print the parts as json")
    args = p.parse_args(argv)
    config = load_config(args.model)
    settings = dict(seq_len=args.seq_len, batch_size=args.batch_size, gpus=args.gpus, fsdp=args.fsdp,
                    grad_checkpoint=args.grad_checkpoint, optim=args.optim, dtype=args.dtype,
                    reference=args.reference)
    parts = plan(config, **settings)
    total = sum(parts.values())
    fits = total <= args.gpu_mem * GiB
    if args.json:
        print(json.dumps({"parts": parts, "total": total, "fits": fits}))
        return parts
    params = sum(math.prod(s) for s in parameter_shapes(config).values())
    print(f"{args.model}: {params / 1e9:.2f}B parameters; seq {args.seq_len} x micro-batch {args.batch_size} per GPU, "
          f"{args.gpus} GPU(s) of {args.gpu_mem:g} GiB, {args.optim}{' --fsdp' if args.fsdp else ''}"
          f"{' --grad_checkpoint' if args.grad_checkpoint else ''}, {args.dtype}")
    for name in PARTS:
        print(f"  {name:<12}{parts[name] / GiB:8.2f} GiB")
    print(f"  {'total':<12}{total / GiB:8.2f} GiB per GPU: {'fits' if fits else 'does NOT fit'}")
    if not fits:
        found = suggestions(config, settings, args.gpu_mem)
        if found:
            print("fits with:")
            for flags, need in found:
                print(f"  {flags}  ({need / GiB:.1f} GiB)")
        else:
            print("nothing tried fits: more GPUs with --fsdp, a shorter --seq_len, or LoRA (5-LoRA.py)")
    return parts


if __name__ == "__main__":
    main()
