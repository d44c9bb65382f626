"""Loading a model to run: a stage's checkpoint (out/<stage>), any transformers folder, a LoRA adapter on top --
the same rules and errors for the chat script, the server, the evaluation and the benchmarks."""

from pathlib import Path

from transformers import AutoTokenizer

from common.distributed import DTYPES, decode_dtype, pick_device
from common.resolve import STAGE_SCRIPTS, checkpoint_tokenizer, resolve_checkpoint
from model import TOKENIZER_DIR
from model.families import load_for_inference
from model.lora import from_adapter, is_adapter_dir, load_adapter

from .engine import Engine
from .quant import quantize_int8

# fixed prompts for a quick look at any checkpoint (eval_model.py --auto, the GGUF comparison)
TEST_PROMPTS = ["你好，请介绍一下你自己。", "中国的首都是哪里？", "3加5等于几？", "What color is the sky?",
                "小明有3个苹果，又买了4个，现在有几个？", "我最近一直咳嗽，应该挂什么科？"]


def add_model_args(parser):
    """Which checkpoint to load, and where: shared by eval_model.py and every script that runs a model."""
    parser.add_argument("--stage", default="sft", choices=sorted(STAGE_SCRIPTS), help="out/<stage> to load")
    parser.add_argument("--model_path", default=None,
                        help="instead of --stage: a checkpoint folder (ours, Hugging Face, MiniMind's) or a .pth")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter folder to put on top")
    parser.add_argument("--preset", default=None,
                        help="the architecture of a bare .pth state dict (MiniMind's): 26m, 104m, moe-145m, minimind3, ...")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder, for a checkpoint without one beside it (a MiniMind .pth)")
    parser.add_argument("--out_dir", default="out")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="auto: bf16 (fp16 on older GPUs) on CUDA; fp32 on a CPU, where it decodes fastest at batch 1")
    parser.add_argument("--compile", action="store_true",
                        help="static KV cache + compiled decode step: faster tokens after a slow first reply")
    parser.add_argument("--quantize", default="none", choices=["none", "int8"],
                        help="int8: int8 weight-only Linear layers (inference/quant.py), ~1/4 of fp32's weight bytes")
    return parser


def load(args):
    """(model, tokenizer, folder) for --stage / --model_path, with --adapter on top; SystemExit naming the missing
    checkpoint and the script that makes it."""
    args.device = str(pick_device(args.device))
    dtype = decode_dtype(args.device) if args.dtype == "auto" else DTYPES[args.dtype]
    path = Path(args.model_path or Path(args.out_dir) / args.stage)
    adapter = args.adapter
    if is_adapter_dir(path):  # out/lora holds only an adapter: its config names the base
        adapter, model = path, from_adapter(path, dtype=dtype)
    else:
        try:
            path = resolve_checkpoint(args.model_path or args.stage, args.out_dir)
            # released Llama / Qwen / MiniMind checkpoints run as MicroLM where exact, else as their stock class
            model, note = load_for_inference(path, getattr(args, "preset", None), dtype=dtype)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(str(e)) from None
        if note:
            print(f"{path}: {note}")
        if adapter:
            load_adapter(model, adapter)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_tokenizer(path, getattr(args, "tokenizer", None),
                                                                   TOKENIZER_DIR))
    model = model.to(args.device).eval()
    if getattr(args, "quantize", "none") == "int8":
        try:
            quantize_int8(model)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    return model, tokenizer, path


def load_engine(args):
    """(Engine, folder): `load` plus the inference core around the model (--compile: a compiled decode step)."""
    model, tokenizer, path = load(args)
    return Engine(model, tokenizer, compile=getattr(args, "compile", False)), path
