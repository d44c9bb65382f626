"""The one training engine: every stage script builds a dataset and (optionally) a method's loss, then calls fit.

`Trainer.fit` reads as its phases: `_setup` (loader, optimizer), `_restore` (--resume), `_start` (wrapping, tracker),
then per window of micro-batches `_count` (with the RL methods' `prepare_window` hook, where rollouts are sampled),
`_train_step` (forward/backward, `_update`) and `_tick` (log / evaluate / save), and `_finish` (curve, report card,
summary). What a fit carries is one `Run`; what a resume restores is its `state`.

What lives here, once: process group and device, precision (autocast + GradScaler for fp16), fused AdamW with decay
groups, warmup + cosine LR per optimizer step, gradient accumulation with no_sync, clipping, NaN/Inf step skipping
(on the device: no host sync per step), exact resume (weights, optimizer, scaler, RNG, data position), checkpoints,
tqdm / wandb / SwanLab logging and the loss-curve PNG.
"""

import argparse
import copy
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from dataset.chat import LOSABLE, describe_lost
from dataset.sft import EMPTY_THINK_RATIO, pack_collate, pad_collate, pad_id_of
from model import TOKENIZER_DIR, MicroLMConfig, MicroLMForCausalLM
from model.families import load_pretrained, model_type

from . import checkpoint as ckpt
from . import fsdp, report
from common.distributed import DTYPES, barrier, cleanup, fast_dtype, init_distributed, to_device
from common.resolve import resolve_checkpoint, resolve_tokenizer
from .evaluation import HeldOut, Rows, split_rows
from .optim import OPTIMIZERS, build_optimizer, state_memory, weight_dtype
from .tracking import Tracker, plot_loss

log = logging.getLogger("trainer")


def add_train_args(parser: argparse.ArgumentParser, *, epochs: int, batch_size: int, learning_rate: float,
                   max_seq_len: int, data_path: str, init_from: str | None = None, preset: str = "26m",
                   accumulation_steps: int = 1, save_interval: int = 1000, pack: bool = False) -> argparse.ArgumentParser:
    """The flags every stage shares (MiniMind's spellings where they exist); defaults are the stage's own. pack: the
    stage trains on chats through `Trainer.chat_collate` (packed unless --no_pack)."""
    a = parser.add_argument
    a("--data_path", default=data_path, help="jsonl file of this stage's format")
    a("--out_dir", default="out", help="checkpoints go to <out_dir>/<stage>/, resume state to .../resume/")
    a("--save_as", default=None, metavar="NAME",
      help="write to <out_dir>/NAME/ instead of <out_dir>/<stage>/ (a second run of a stage that must not replace "
           "the first, e.g. tool-use SFT on top of sft; MiniMind's --save_weight); later stages take --from NAME")
    a("--from", dest="init_from", default=init_from,
      help="initialise from a stage's output (pretrain, sft, ...), a checkpoint folder (ours, Hugging Face Llama / "
           "Qwen2 / Qwen3 / Mixtral / Qwen3-MoE, MiniMind's) or a MiniMind .pth with --preset; none = random init")
    a("--preset", default=None,
      help=f"model size from scratch (default {preset}): 26m, 104m, moe-145m, minimind3, minimind3-moe, tiny, ...; "
           f"with --from FILE.pth the architecture of that state dict")
    parser.set_defaults(default_preset=preset)
    a("--use_moe", action="store_true", help="mixture-of-experts feed-forward layers (from scratch only)")
    a("--tokenizer", default=None,
      help="tokenizer folder (ours, or MiniMind's official one); default: the one saved beside the --from checkpoint, "
           "else ours")
    a("--epochs", type=int, default=epochs)
    a("--max_steps", type=int, default=0,
      help="optimizer steps to take (0 = all of --epochs); more than --epochs hold runs more epochs, and says so")
    a("--batch_size", type=int, default=batch_size, help="rows per micro-batch per process")
    a("--accumulation_steps", type=int, default=accumulation_steps)
    a("--learning_rate", type=float, default=learning_rate)
    a("--min_lr_ratio", type=float, default=0.1, help="cosine schedule ends at learning_rate * this")
    a("--warmup_steps", type=int, default=-1, help="linear warmup steps (-1 = 1%% of the run)")
    a("--weight_decay", type=float, default=0.01)
    a("--grad_clip", type=float, default=1.0, help="max gradient norm (0 = no clipping)")
    a("--max_seq_len", type=int, default=max_seq_len)
    a("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
      help="autocast dtype; float16 adds a GradScaler; auto: bf16 where the device computes it natively (CUDA with "
           "bf16, CPUs with AVX512-BF16/AMX), fp16 on older GPUs, fp32 elsewhere (emulated bf16 is ~50x slower)")
    a("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    a("--num_workers", type=int, default=1, help="DataLoader worker processes")
    a("--seed", type=int, default=42)
    a("--log_interval", type=int, default=10)
    a("--save_interval", type=int, default=save_interval, help="optimizer steps between checkpoints")
    a("--resume", action="store_true", help="continue from <out_dir>/<stage>/resume/ if it exists")
    a("--stop_at_step", type=int, default=0, help="save and exit after this step, as a preempted run would")
    a("--strict", action="store_true", help="stop at the first malformed data line instead of skipping it")
    a("--max_bad_steps", type=int, default=5, help="stop after this many non-finite steps in a row")
    a("--eval_data", default=None, metavar="FILE",
      help="held-out jsonl in this stage's format: its loss (and bits per byte) is logged every --eval_interval steps")
    a("--eval_split", type=float, default=0.0, metavar="FRACTION",
      help="hold out this seeded share of the training file's rows instead (never trained on)")
    a("--eval_interval", type=int, default=100, help="optimizer steps between held-out evaluations")
    a("--eval_batches", type=int, default=50, help="batches per rank and evaluation (0 = the whole held-out set)")
    a("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    a("--grad_checkpoint", action="store_true",
      help="recompute each block's activations in the backward pass: far less memory, ~1/3 more compute")
    a("--group_by_length", action="store_true",
      help="batch rows of similar length together (SFT/DPO/...: less padding, faster; off by default: on the small "
           "demo data it cost held-out quality)")
    a("--no_fused_adamw", dest="fused_adamw", action="store_false",
      help="plain AdamW instead of the fused kernel (which also skips a non-finite step without a host sync)")
    a("--optim", default="adamw", choices=OPTIMIZERS,
      help="adamw: fp32 weights and moments, 16 bytes/parameter with the gradient; adamw8bit: torchao's 8-bit "
           "moments (fp32 for the embeddings), ~11; adamw_bf16: bf16 weights and moments with stochastically "
           "rounded updates, 8 (docs/bigger_models.md)")
    a("--fsdp", action="store_true",
      help="shard weights, gradients and optimizer state over the ranks (FSDP2, one unit per decoder block): "
           "their memory per GPU ~1/N; resume state saved sharded, resumable on another number of ranks "
           "(docs/bigger_models.md)")
    a("--logger", default="none", choices=["none", "wandb", "swanlab"], help="experiment tracker")
    a("--use_wandb", action="store_true", help="same as --logger wandb")
    a("--wandb_project", default="LLM_implementation", help="wandb / SwanLab project name")
    a("--image_dir", default="images", help="where the loss-curve PNG is written")
    if pack:
        a("--no_pack", dest="pack", action="store_false",
          help="one padded row per conversation instead of packing each micro-batch's conversations into rows of "
               "--max_seq_len, each attending only to itself (the same conversations per step and the same loss, "
               "without the padding)")
    a("--empty_think_ratio", type=float, default=EMPTY_THINK_RATIO,
      help="chat stages: share of rows without reasoning whose assistant turns get the empty think block "
           "(adaptive thinking, MiniMind's way; picked per row by a seeded hash)")
    return parser


# ---------------------------------------------------------------------------------------------------------------------
# pieces that the stages reuse

def lm_loss(model, batch):
    """Summed next-token cross-entropy over labelled positions (+ MoE balance loss); the engine normalises. With
    batch["weights"] (6-reason.py's tag weights) each label counts that many times, in the sum and in the count."""
    # the model computes the per-position cross-entropy itself: in chunks for a large vocabulary (model/model.py)
    # position_ids come with packed rows (chat packing, --doc_mask): the model keeps each document to itself
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                position_ids=batch.get("position_ids"), labels=batch["labels"], reduction="none")
    ce = out.loss
    loss = (ce * batch["weights"][:, 1:]).sum() if "weights" in batch else ce.sum()
    if out.aux_loss is not None:
        loss = loss + out.aux_loss * count_label_tokens(batch)
    return loss, {}


def count_label_tokens(batch) -> torch.Tensor:
    if "weights" in batch:
        return batch["weights"][:, 1:].sum()
    return (batch["labels"][:, 1:] != -100).sum()


def batch_tokens(batch) -> tuple[int, int]:
    """(real, fed): a batch's input tokens without padding (what the collate counted as "real_tokens", else an
    attention mask's ones) and with it. Read on the host, before the batch moves to the device."""
    if "input_ids" not in batch:
        return 0, 0
    fed, real = batch["input_ids"].numel(), batch.get("real_tokens")
    if real is None and "attention_mask" in batch:
        real = batch["attention_mask"].sum()
    return (fed if real is None else int(real.sum()) if torch.is_tensor(real) else int(real)), fed


def lr_at(step: int, total_steps: int, base_lr: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model, weight_decay: float):
    """Decay matrices; never norms, biases or embeddings (decaying them only hurts)."""
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class ShardedBatchSampler:
    """Global, seeded order per epoch; each optimizer micro-step takes the next world*batch rows and rank r its
    slice. The position is counted in global rows, so a resumed run (even with another world size) continues
    at the same row.

    With `lengths`, rows of similar length share batches, so pad_collate pads less: the shuffled order is sorted by
    length within windows of `window` rows, then cut into blocks of `block` rows that are shuffled again (no trend
    from long to short). The order depends only on seed, epoch and lengths -- not on the world size."""

    def __init__(self, n: int, batch_size: int, world_size: int, rank: int, seed: int, shuffle: bool = True,
                 lengths=None, window: int = 8192, block: int = 256):
        self.n, self.batch_size, self.world_size, self.rank = n, batch_size, world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.lengths = None if lengths is None else torch.as_tensor(lengths)
        self.window, self.block = window, block
        self.rows_per_micro = batch_size * world_size
        self.micro_per_epoch = n // self.rows_per_micro
        self.epoch, self.start_row = 0, 0

    def set_epoch(self, epoch: int, start_row: int = 0):
        self.epoch, self.start_row = epoch, start_row

    def __len__(self):
        return self.micro_per_epoch - self.start_row // self.rows_per_micro

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        if self.lengths is not None:
            order = self._group_by_length(order, g)
        G, B = self.rows_per_micro, self.batch_size
        for k in range(self.start_row // G, self.micro_per_epoch):
            yield order[k * G + self.rank * B: k * G + (self.rank + 1) * B].tolist()

    def _group_by_length(self, order: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        grouped = []
        for start in range(0, self.n, self.window):
            idx = order[start:start + self.window]
            idx = idx[torch.argsort(self.lengths[idx], descending=True, stable=True)]
            blocks = list(idx.split(self.block))
            grouped += [blocks[i] for i in torch.randperm(len(blocks), generator=g).tolist()]
        return torch.cat(grouped)


# ---------------------------------------------------------------------------------------------------------------------

def new_state() -> dict:
    """What a resume restores besides tensors (saved as JSON): position, histories, the tracker's run id."""
    return {"step": 0, "epoch": 0, "row": 0, "history": [], "metric_history": [], "eval_history": [], "run_id": None,
            "bad_steps": 0}


@dataclass
class Run:
    """One fit(): what it trains with, and what moves while it does (`state` is the resumable part)."""
    model: torch.nn.Module
    net: torch.nn.Module  # the model as wrapped for training: compiled and/or DDP
    optimizer: torch.optim.Optimizer
    scaler: object
    trainable: list
    sampler: "ShardedBatchSampler"
    loader: DataLoader
    loader_rng: torch.Generator
    total_steps: int
    warmup: int
    loss_fn: object
    count_fn: object
    save_fn: object
    prepare_window: object
    state: dict
    empty_rows: torch.Tensor  # rows with no trainable token, counted on the device
    bad_run: torch.Tensor = None  # non-finite steps in a row, on the device
    held: object = None
    tracker: object = None
    bar: object = None
    stopped: bool = False
    lr: float = 0.0
    grad_norm: torch.Tensor = None
    epochs: int = 1
    tokens: int = 0  # real (non-padding) input tokens on this rank
    padded_tokens: int = 0  # input_ids fed, padding included
    lost: torch.Tensor = None  # rows whose chat template left a field out, per dataset.chat.LOSABLE field
    t0: float = 0.0
    t_step: float = 0.0
    warm: tuple = None  # (time, tokens) after the first step
    last_metrics: dict = field(default_factory=dict)
    pending: list = field(default_factory=list)  # (loss, metrics) per step since the last log, on the device
    skeleton: object = None  # --fsdp: the model's weightless structure (fsdp.Skeleton), to save and sample from
    memory: dict = None  # bytes this rank holds for weights, gradients and optimizer state (after the first step)
    unchecked: list = field(default_factory=list)  # (step, bad_run) since the last finite check


class Trainer:
    def __init__(self, args, stage: str):
        self.args, self.stage = args, stage
        if args.use_wandb:
            args.logger = "wandb"
        self.env = init_distributed(args.device)
        logging.basicConfig(level=logging.INFO if self.env.is_main else logging.WARNING, format="%(message)s",
                            force=True)
        hf_logging.disable_progress_bar()  # our own bar is the one that matters
        self.device = self.env.device
        if args.dtype == "auto":
            args.dtype = {v: k for k, v in DTYPES.items()}[fast_dtype(self.device)]
        self.dtype = DTYPES[args.dtype]
        if getattr(args, "fsdp", False) and self.dtype == torch.float16:
            raise SystemExit("--fsdp trains in bf16 or fp32: fp16's loss scaling is not wired to sharded gradients "
                             "(give --dtype bfloat16, which every GPU since Ampere computes natively)")
        self.sampling_copy = None  # --fsdp: the whole policy the RL methods sample from (fsdp.RolloutCopy)
        self.updates = 0  # optimizer steps taken (the vLLM rollout engine syncs by it)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: ~free speed, fp32 checkpoints unchanged
            torch.backends.cudnn.allow_tf32 = True
        self.autocast = (nullcontext() if self.dtype == torch.float32
                         else torch.autocast(self.device.type, dtype=self.dtype))
        self.stage_dir = Path(args.out_dir) / stage
        self._check_writable()
        args.tokenizer = str(resolve_tokenizer(args.tokenizer, args.init_from, args.out_dir, TOKENIZER_DIR))
        self.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        torch.manual_seed(args.seed)

    def _check_writable(self):
        """Fail now, not after an hour of training, if checkpoints cannot be written."""
        try:
            self.stage_dir.mkdir(parents=True, exist_ok=True)
            probe = self.stage_dir / f".write_probe{self.env.rank}"
            probe.write_bytes(b"0" * 4096)
            probe.unlink()
        except OSError as e:
            raise SystemExit(f"cannot write checkpoints to {self.stage_dir}: {e}") from None

    def log(self, msg: str):
        if self.env.is_main:
            tqdm.write(msg)

    def frozen_copy(self, model, device=None):
        """The frozen reference (DPO, GRPO, PPO) before training starts: no gradients, no optimizer state, held in
        the compute dtype (bf16 on a GPU: half the memory of fp32; autocast computes in it anyway)."""
        ref = copy.deepcopy(model).eval().requires_grad_(False)
        ref.to(device or self.device)
        return ref.to(self.dtype) if self.dtype != torch.float32 else ref

    def sampling_model(self, policy):
        """The model rollouts are sampled from: the policy itself, or under --fsdp its gathered whole copy (each
        rank's decode loop ends when its own rows do, so it cannot run on shards that gather in lockstep)."""
        return self.sampling_copy(policy) if self.sampling_copy is not None else policy

    # -- model --------------------------------------------------------------------------------------------------------
    def build_model(self, **overrides) -> MicroLMForCausalLM:
        """From `--from` (a stage name or folder; strict: any mismatch is an error) or a fresh `--preset`."""
        args = self.args
        if args.init_from and str(args.init_from).lower() != "none":
            path = resolve_checkpoint(args.init_from, args.out_dir)
            try:
                model = load_pretrained(path, args.preset)
            except ValueError as e:  # not an exact mapping, a .pth without --preset, mismatched tensors
                raise SystemExit(str(e)) from None
            self.log(f"initialised from {path}" + (f" ({model_type(path)})" if model_type(path) != "microlm" else ""))
        else:
            if args.use_moe:
                overrides.setdefault("use_moe", True)
            model = MicroLMForCausalLM(MicroLMConfig.from_preset(args.preset or args.default_preset, **overrides))
        if len(self.tokenizer) > model.config.vocab_size:
            raise ValueError(f"tokenizer {args.tokenizer} has {len(self.tokenizer)} tokens but the model's "
                             f"vocab_size is {model.config.vocab_size}")
        counts = model.param_counts()
        self.log(f"model: {counts['total'] / 1e6:.2f}M parameters ({counts['active'] / 1e6:.2f}M active)")
        return model.to(self.device)

    def split(self, load):
        """(training dataset, held-out dataset or None). `load(path)` builds the stage's dataset from a jsonl file:
        --eval_data FILE loads a second file, --eval_split F holds out a seeded share F of the training rows."""
        args = self.args
        data = load(args.data_path)
        if args.eval_data and args.eval_split:
            raise SystemExit("--eval_data and --eval_split: give one of them")
        if args.eval_data:
            if not Path(args.eval_data).exists():
                raise SystemExit(f"--eval_data {args.eval_data}: no such file (a jsonl in this stage's format)")
            return data, load(args.eval_data)
        if args.eval_split:
            train, held = split_rows(len(data), args.eval_split, args.seed)
            self.log(f"held out {len(held)} of {len(data)} rows of {args.data_path} (--eval_split {args.eval_split})")
            return Rows(data, train), Rows(data, held)
        return data, None

    def split_chat(self, dataset_cls, **extra):
        """`split` for the chat formats (SFTDataset, DPODataset, ReasonDataset): the stage's tokenizer, length,
        --strict, --seed and adaptive-thinking ratio."""
        args = self.args
        return self.split(lambda path: dataset_cls(path, self.tokenizer, args.max_seq_len, strict=args.strict,
                                                   empty_think_ratio=args.empty_think_ratio, seed=args.seed, **extra))

    @property
    def pad_id(self) -> int:
        return pad_id_of(self.tokenizer)

    def collate(self, collate_fn):
        """A dataset's collate function padding with this tokenizer's pad id."""
        return partial(collate_fn, pad_id=self.pad_id)

    def chat_collate(self):
        """The chat stages' batches: conversations packed into rows (the default) or one padded row each (--no_pack)."""
        if getattr(self.args, "pack", False):
            return partial(pack_collate, pad_id=self.pad_id, max_seq_len=self.args.max_seq_len)
        return self.collate(pad_collate)

    # -- training -----------------------------------------------------------------------------------------------------
    def fit(self, model, dataset, collate_fn=None, loss_fn=lm_loss, count_fn=count_label_tokens, save_fn=None,
            shuffle: bool = True, curve: str = "loss", eval_dataset=None, repeat: int = 1,
            prepare_window=None, mini_batches: int = 1, stop_repeat=None) -> dict:
        """Train `model` on `dataset`; returns a summary (steps, losses, seconds) for the demo runner.

        loss_fn(model, batch) -> (summed loss, {name: summed metric}); count_fn(batch) -> how many units those sums
        cover (label tokens by default, pairs for DPO); metrics are logged as per-unit means. The engine divides by
        the count over the whole optimizer step and all ranks, so batch 2 x accumulation 2 == batch 4 x accumulation
        1 == 2 ranks x batch 2, whatever the padding. save_fn(model, folder) replaces the default save_pretrained
        (LoRA saves only its adapter). curve: what the PNG shows, "loss" or one of loss_fn's metrics (GRPO: "reward").
        eval_dataset (see `split`): scored every --eval_interval steps, at the start and at the end (evaluation.py).
        prepare_window(micro_batches): called once per window of micro-batches before anything is counted -- where
        the RL methods sample and score their rollouts into the batches (trainer/rl.py). repeat: passes over each
        window (GRPO's and PPO's epochs over one rollout batch), each pass `mini_batches` optimizer steps on equal
        parts of the window's micro-batches (PPO's mini-batches). stop_repeat(): asked after each pass, True skips the
        window's remaining passes (PPO's KL early stop; it must answer the same on every rank).
        """
        A = self.args.accumulation_steps
        if mini_batches < 1 or A % mini_batches:
            raise SystemExit(f"{mini_batches} mini-batches: each takes an equal share of the --accumulation_steps "
                             f"{A} micro-batches of a step, so it must divide {A}")
        run = self._setup(model, dataset, collate_fn, shuffle, loss_fn, count_fn, save_fn, prepare_window,
                          repeat * mini_batches)
        self._restore(run)
        self._start(run, eval_dataset, collate_fn)
        state = run.state
        while state["epoch"] < run.epochs and state["step"] < run.total_steps and not run.stopped:
            for micro in self._windows(run):
                size = len(micro) // mini_batches
                parts = [micro[k:k + size] for k in range(0, len(micro), size)]
                totals, done = self._count(run, micro, parts), False
                for i in range(repeat):
                    for j, (part, total) in enumerate(zip(parts, totals)):
                        if state["step"] >= run.total_steps or run.stopped:
                            break
                        self._train_step(run, part, total)
                        done = j == len(parts) - 1 and (i == repeat - 1 or (stop_repeat is not None and stop_repeat()))
                        if done:  # a resume starts at the next window
                            state["row"] += A * self.env.world_size * self.args.batch_size
                        run.stopped = self._tick(run)
                    if done or state["step"] >= run.total_steps or run.stopped:
                        break
                if state["step"] >= run.total_steps or run.stopped:
                    break
            else:  # the epoch is done (a short last window is dropped)
                state["epoch"], state["row"] = state["epoch"] + 1, 0
        return self._finish(run, dataset, curve)

    def _setup(self, model, dataset, collate_fn, shuffle, loss_fn, count_fn, save_fn, prepare_window, repeat):
        """The loader (global seeded order, sharded per rank), the optimizer and, for fp16, the GradScaler."""
        args, env = self.args, self.env
        A, B, W = args.accumulation_steps, args.batch_size, env.world_size
        lengths = getattr(dataset, "lengths", None) if args.group_by_length else None
        sampler = ShardedBatchSampler(len(dataset), B, W, env.rank, args.seed, shuffle, lengths)
        steps_per_epoch = sampler.micro_per_epoch // A
        if steps_per_epoch == 0:
            raise ValueError(f"{len(dataset)} rows are fewer than one optimizer step needs "
                             f"({W} ranks x batch {B} x accumulation {A})")
        per_epoch, epochs = steps_per_epoch * repeat, args.epochs
        if args.max_steps > epochs * per_epoch:  # --max_steps is what was asked for: more epochs, and say so
            epochs = -(-args.max_steps // per_epoch)
            self.log(f"--max_steps {args.max_steps} takes {epochs} epochs of {per_epoch} steps: training {epochs} "
                     f"epochs instead of --epochs {args.epochs}")
        total_steps = args.max_steps or epochs * per_epoch
        # the loader's own generator: iter(loader) draws the workers' base seed from it, not from the global RNG that
        # --resume restores (that draw shifted every later dropout mask and sampled token after a resume)
        loader_rng = torch.Generator()
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=args.num_workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=False, generator=loader_rng)
        if weight_dtype(args.optim) != torch.float32:  # pure-bf16 training: the weights themselves
            model.to(weight_dtype(args.optim))
        skeleton = None
        if args.fsdp and not all(p.requires_grad for p in model.parameters()):
            self.log("--fsdp: this model trains an adapter on a frozen base (LoRA), whose trainable state is small: "
                     "training with DDP, every rank holding the whole base")
        elif args.fsdp:  # before the optimizer: sharding replaces every parameter by its shard
            skeleton = fsdp.shard(model, self.dtype, self.device)
            self.sampling_copy = fsdp.RolloutCopy(skeleton, model, self.dtype)
            self.log(f"--fsdp: {sum(isinstance(m, fsdp.FSDPModule) for m in model.modules())} units sharded over "
                     f"{W} rank(s)")
        # a model with several parts (PPO's policy + value model) may give its own groups, each with an lr_scale
        groups = (model.param_groups(args.weight_decay) if hasattr(model, "param_groups")
                  else param_groups(model, args.weight_decay))
        optimizer = build_optimizer(args.optim, groups, args.learning_rate, fused=args.fused_adamw,
                                    fp32_state=[m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)])
        return Run(model=model, net=model, optimizer=optimizer, skeleton=skeleton,
                   scaler=torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None,
                   trainable=[p for p in model.parameters() if p.requires_grad], sampler=sampler, loader=loader,
                   loader_rng=loader_rng, total_steps=total_steps,
                   warmup=args.warmup_steps if args.warmup_steps >= 0 else max(1, total_steps // 100),
                   loss_fn=loss_fn, count_fn=count_fn, save_fn=save_fn, prepare_window=prepare_window,
                   state=new_state(), empty_rows=torch.zeros((), device=self.device), epochs=epochs,
                   lost=torch.zeros(len(LOSABLE), dtype=torch.long, device=self.device))

    def _restore(self, run):
        """--resume: weights, optimizer, scaler, RNG and data position from the last complete checkpoint."""
        args, env, B, W = self.args, self.env, self.args.batch_size, self.env.world_size
        resume_path = ckpt.find_resume(self.stage_dir) if args.resume else None
        if resume_path is not None:
            run.state = ckpt.load_resume(resume_path, run.model, run.optimizer, run.scaler, env.rank)
            if run.state["row"] % (W * B):
                log.warning("resume position %d is not a multiple of %d rows per micro-step: rounding down",
                            run.state["row"], W * B)
            self.log(f"resumed from {resume_path} at step {run.state['step']} (epoch {run.state['epoch']}, "
                     f"row {run.state['row']})")
        elif args.resume:
            self.log(f"no resume state in {self.stage_dir / 'resume'}; starting from the beginning")
        if resume_path is None and env.rank > 0:
            # each rank its own stream for dropout and sampling: every rank had seeded args.seed, so their masks were
            # the same. Rank 0 (and so a single process) keeps the stream it always had; a resumed run restores each
            # rank's saved state instead
            torch.manual_seed(args.seed + 1_000_003 * env.rank)
        run.bad_run = torch.tensor(run.state["bad_steps"], device=self.device)

    def _start(self, run, eval_dataset, collate_fn):
        """Held-out set, activation checkpointing, compile, DDP, tracker and progress bar; the step-0 evaluation."""
        args, env, model = self.args, self.env, run.model
        if eval_dataset is not None:
            run.held = HeldOut(eval_dataset, collate_fn, run.loss_fn, run.count_fn, self.tokenizer, env,
                               args.batch_size, args.eval_batches, self.autocast, model.config.vocab_size,
                               token_level=run.count_fn is count_label_tokens, lockstep=run.skeleton is not None)
        if args.grad_checkpoint:  # non-reentrant: works with frozen inputs (LoRA) and keeps dropout's RNG per block
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            n = sum(getattr(m, "gradient_checkpointing", False) for m in model.modules())
            self.log(f"activation checkpointing: {n} blocks recompute in the backward pass")
        if args.compile:
            run.net = torch.compile(run.net)
        if env.world_size > 1 and run.skeleton is None:  # --fsdp: already sharded in _setup
            # the only buffers are the RoPE tables, computed identically on every rank: broadcasting them (~16 MiB
            # for 26m) before every synced forward is pure traffic
            run.net = DistributedDataParallel(run.net, broadcast_buffers=False,
                                              device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if env.is_main:
            run.tracker = Tracker(args.logger, args.wandb_project, f"{self.stage}-{time.strftime('%m%d-%H%M')}",
                                  vars(args), self.stage_dir, run.state.get("run_id"))
            run.state["run_id"] = run.tracker.run_id
        run.bar = tqdm(total=run.total_steps, initial=run.state["step"], desc=self.stage, disable=not env.is_main,
                       dynamic_ncols=True)
        run.t0 = time.time()
        if run.held is not None and run.state["step"] == 0:
            self._evaluate(run)
        model.train()

    def _windows(self, run):
        """The current epoch's windows of --accumulation_steps micro-batches on the device, from the resume row."""
        state, A = run.state, self.args.accumulation_steps
        run.sampler.set_epoch(state["epoch"], state["row"])
        run.loader_rng.manual_seed(self.args.seed + state["epoch"])  # same worker seeds, resumed or not, any world
        batches = iter(run.loader)
        while len(micro := [to_device({**b, "n_tokens": batch_tokens(b)}, self.device)
                            for b in islice(batches, A)]) == A:
            yield micro

    def _count(self, run, micro, parts) -> torch.Tensor:
        """What each optimizer step's summed losses are divided by: count_fn over the micro-batches of its part of the
        window and all ranks (after prepare_window, which fills RL batches with their rollouts)."""
        if run.prepare_window is not None:
            run.prepare_window(micro)
        totals = torch.stack([torch.stack([torch.as_tensor(run.count_fn(b), device=self.device) for b in part])
                              .float().sum() for part in parts])
        if self.env.world_size > 1:
            dist.all_reduce(totals)
        return totals

    def _train_step(self, run, micro, total):
        """Forward and backward over the window's micro-batches (gradients synced on the last), then one update."""
        W, A = self.env.world_size, len(micro)
        step_loss, step_metrics = torch.zeros((), device=self.device), {}
        for i, b in enumerate(micro):
            # --fsdp reduce-scatters every micro-batch into the gradient shards: skipping it would hold whole
            # gradients between micro-batches, the memory sharding is there to save
            with nullcontext() if W == 1 or i == A - 1 or run.skeleton is not None else run.net.no_sync():
                with self.autocast:
                    loss_sum, metrics = run.loss_fn(run.net, b)
                loss = loss_sum / total.clamp(min=1)
                step_loss += loss.detach()
                for k, v in metrics.items():  # summed like the loss, so normalised the same way
                    step_metrics[k] = step_metrics.get(k, 0) + v.detach().float() / total.clamp(min=1)
                loss = loss * W  # DDP averages gradients over ranks; the normaliser is already global
                (run.scaler.scale(loss) if run.scaler else loss).backward()
            if "empty_rows" in b:  # packed rows: the collate counted the conversations
                run.empty_rows += b["empty_rows"]
            elif "labels" in b:
                run.empty_rows += ((b["labels"] != -100).sum(1) == 0).sum()
            if "lost" in b:
                run.lost += b["lost"]
            run.tokens += b["n_tokens"][0]
            run.padded_tokens += b["n_tokens"][1]
        self._update(run)
        state = run.state
        state["step"] += 1
        run.unchecked.append((state["step"], run.bad_run))
        run.pending.append((step_loss, step_metrics))
        run.bar.update(1)
        run.t_step = time.time()
        if run.warm is None:  # throughput is measured from here: without start-up and compilation
            run.warm = (run.t_step, run.tokens)

    def _update(self, run):
        """LR for this step, unscale, clip, and the optimizer step unless the gradient is non-finite."""
        args = self.args
        run.lr = lr_at(run.state["step"], run.total_steps, args.learning_rate, run.warmup, args.min_lr_ratio)
        for group in run.optimizer.param_groups:
            lr = run.lr * group.get("lr_scale", 1.0)
            if torch.is_tensor(group["lr"]):  # torchao's optimizers keep it as a tensor (no recompile per value)
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        if run.scaler:
            run.scaler.unscale_(run.optimizer)
        run.grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, args.grad_clip or float("inf"))
        if hasattr(run.grad_norm, "full_tensor"):  # --fsdp: the norm over every rank's shards
            run.grad_norm = run.grad_norm.full_tensor()
        finite = torch.isfinite(run.grad_norm)  # the same on every rank: gradients are already all-reduced
        self._optimizer_step(run.optimizer, run.scaler, finite)
        if run.memory is None:  # after the first step, when the optimizer state exists and before the grads go
            run.memory = state_memory(run.model, run.optimizer)
            self.log("memory on rank 0: " + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in run.memory.items()))
        if self.sampling_copy is not None:
            self.sampling_copy.invalidate()
        self.updates += 1  # the rollout engine syncs its weights by this count
        run.optimizer.zero_grad(set_to_none=True)
        # non-finite steps: counted on the device, looked at (one sync) when logging or saving
        run.bad_run = torch.where(finite, torch.zeros_like(run.bad_run), run.bad_run + 1)

    def _tick(self, run) -> bool:
        """Log, evaluate and save when their intervals say so; True when --stop_at_step is reached."""
        args, step = self.args, run.state["step"]
        last, stop = step >= run.total_steps, step == args.stop_at_step
        log_now = step % args.log_interval == 0 or last or stop
        save_now = step % args.save_interval == 0 or last or stop
        if log_now or save_now:
            self._check_finite(run)
        if log_now:
            run.last_metrics = self._flush(run)
        if run.held is not None and (step % args.eval_interval == 0 or last):
            self._evaluate(run)
        if save_now:
            self._save(run)
        if stop:
            self.log(f"stopping at step {step} (--stop_at_step)")
        return stop

    def _finish(self, run, dataset, curve: str) -> dict:
        """Close the bar, say what was skipped, draw the curve, append to the report card; the run's summary."""
        run.bar.close()
        args, W, state = self.args, self.env.world_size, run.state
        empty, lost = run.empty_rows.clone(), run.lost.clone()
        warm = run.warm
        # token counts differ between ranks (padding, packing): the totals are summed, not rank 0's times W
        counts = torch.tensor([run.tokens, run.padded_tokens, warm[1] if warm else 0], device=self.device)
        if W > 1:
            dist.all_reduce(empty)
            dist.all_reduce(lost)
            dist.all_reduce(counts)
        tokens, padded, warm_tokens = counts.tolist()
        bad_lines = len(getattr(getattr(dataset, "rows", getattr(dataset, "docs", None)), "bad_lines", []))
        if bad_lines:
            self.log(f"{args.data_path}: {bad_lines} malformed line(s) were skipped (see the warnings above)")
        if int(empty):
            self.log(f"{int(empty)} row(s) had no trainable token (e.g. the reply was truncated away) and taught "
                     f"nothing")
        if int(lost.sum()):
            self.log(f"rows trained without a field their chat template does not render, counted each time they were "
                     f"read: {describe_lost(lost.tolist())}; the warnings above name them (docs/data.md, chat rows)")
        history, seconds = state["history"], time.time() - run.t0
        evaluated = state["eval_history"][-1][1] if state.get("eval_history") else {}
        if self.env.is_main and history:
            self._plot(run, curve)
        if run.tracker:
            run.tracker.finish()
        if self.env.is_main and history:
            report.append(args.out_dir, {
                "kind": "stage", "stage": self.stage, "data": str(args.data_path), "rows": len(dataset),
                # input tokens without padding (padded: with it); None where the loss makes its own (RL's rollouts)
                "model": str(args.init_from or args.preset or args.default_preset), "steps": state["step"],
                "tokens": tokens or None, "padded_tokens": padded or None, "seconds": seconds,
                "tokens_per_s": tokens / max(seconds, 1e-9) if tokens else None,
                "train_loss": history[-1][1], "eval_loss": evaluated.get("loss"), "eval_bpb": evaluated.get("bpb"),
                "eval_data": args.eval_data or (f"{args.eval_split:.0%} of the data" if args.eval_split else None),
                # rank 0's bytes for weights, gradients, optimizer state (--fsdp: its shards)
                "memory": run.memory},
                image_dir=args.image_dir)
        barrier()
        steady = (tokens - warm_tokens) / (run.t_step - warm[0]) if warm and run.t_step > warm[0] else None
        return {"steps": state["step"], "history": history, "seconds": seconds, "metrics": run.last_metrics,
                "metric_history": state.get("metric_history", []), "eval_history": state.get("eval_history", []),
                "eval": evaluated or None, "tokens": tokens, "padded_tokens": padded, "memory": run.memory,
                "tokens_per_s_after_first_step": steady,
                "first_loss": history[0][1] if history else None, "last_loss": history[-1][1] if history else None}

    def _plot(self, run, curve: str):
        state, history = run.state, run.state["history"]
        png = Path(self.args.image_dir) / f"{self.stage}_{curve}.png"
        if curve == "loss":
            plot_loss(history, png, f"{self.stage} loss",
                      held_out=[(st, e["loss"]) for st, e in state.get("eval_history", [])])
        else:  # logged as means over each --log_interval
            plot_loss([(s, m[curve]) for s, m in state.get("metric_history", []) if curve in m], png,
                      f"{self.stage} {curve}", ylabel=curve)
        self.log(f"loss {history[0][1]:.3f} -> {history[-1][1]:.3f} over {state['step']} steps; curve: {png}")

    @staticmethod
    def _optimizer_step(optimizer, scaler, finite: torch.Tensor):
        """Update unless the gradient is non-finite. GradScaler (fp16) skips by itself; the fused AdamW kernel skips
        on the device when handed `found_inf` (what GradScaler does for it), so no host sync; otherwise we ask."""
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        elif getattr(optimizer, "_step_supports_amp_scaling", False) and optimizer.defaults.get("fused"):
            optimizer.found_inf = (~finite).float()
            optimizer.step()
            del optimizer.found_inf
        elif finite:
            optimizer.step()

    def _check_finite(self, run):
        """Report the skipped (non-finite) steps since the last look; stop after --max_bad_steps in a row."""
        runs = torch.stack([bad for _, bad in run.unchecked]).tolist()
        steps = [step for step, _ in run.unchecked]
        run.unchecked.clear()
        limit = self.args.max_bad_steps if not run.scaler else max(self.args.max_bad_steps, 30)
        for step, bad in zip(steps, runs):
            if bad:
                self.log(f"step {step}: non-finite loss or gradient, update skipped ({bad} in a row)")
            if bad >= limit:
                raise RuntimeError(f"{bad} non-finite steps in a row at step {step}: stopping; the last good "
                                   f"checkpoint in {self.stage_dir} is kept. Lower --learning_rate or check the data.")
        run.state["bad_steps"] = runs[-1]

    def _flush(self, run) -> dict:
        """Move the per-step losses and the loss_fn's metrics to the host (the only regular sync besides the finite
        check), log them, and return the metrics' means over the interval."""
        state, pending = run.state, run.pending
        losses = torch.stack([loss for loss, _ in pending])
        names = sorted({k for _, m in pending for k in m})
        means = torch.stack([torch.stack([m.get(k, torch.zeros((), device=self.device)) for _, m in pending]).mean()
                             for k in names]) if names else None
        if self.env.world_size > 1:
            dist.all_reduce(losses)
            if means is not None:
                dist.all_reduce(means)  # each rank's share is already divided by the global count
        values = losses.tolist()
        metrics = dict(zip(names, means.tolist())) if names else {}
        start = state["step"] - len(values) + 1
        state["history"].extend([s, v] for s, v in zip(range(start, state["step"] + 1), values))
        if metrics:
            state.setdefault("metric_history", []).append([state["step"], metrics])
        pending.clear()
        per_s = self.env.world_size / max(time.time() - run.t0, 1e-9)
        tok_s = run.tokens * per_s  # real tokens; the padded rate beside it shows what padding costs
        run.bar.set_postfix(loss=f"{values[-1]:.3f}", lr=f"{run.lr:.2e}", tok_s=f"{tok_s:,.0f}")
        if run.tracker:
            run.tracker.log({"loss": values[-1], "lr": run.lr, "grad_norm": float(run.grad_norm),
                             "tokens_per_s": tok_s, "padded_tokens_per_s": run.padded_tokens * per_s,
                             "epoch": state["epoch"], **metrics}, step=state["step"])
        return metrics

    def _evaluate(self, run):
        result = run.held.run(run.model)
        state = run.state
        state.setdefault("eval_history", []).append([state["step"], result])
        bpb = f", {result['bpb']:.4f} bits per byte" if "bpb" in result else ""
        self.log(f"step {state['step']}: held-out loss {result['loss']:.4f}{bpb} ({result['tokens']:,} "
                 f"{'tokens' if 'bpb' in result else 'units'} of {run.held.rows} rows)")
        if run.tracker:
            run.tracker.log({f"eval/{k}": v for k, v in result.items()}, step=state["step"])

    def _save(self, run):
        try:
            if run.skeleton is not None:  # a stale folder of a torn save must not mix into this one's shards
                ckpt.clear_resume_tmp(self.stage_dir, self.env.is_main)
                barrier()
            ckpt.write_rank_rng(self.stage_dir, self.env.rank)
            model = run.model
            if run.skeleton is not None:  # every rank writes its shards; the weights alone are gathered, on rank 0
                fsdp.save_resume(ckpt.resume_tmp_dir(self.stage_dir) / ckpt.SHARDED, run.model, run.optimizer)
                weights = fsdp.full_state_dict(run.model)
                model = run.skeleton.build(weights) if self.env.is_main else None
            barrier()
            if self.env.is_main:
                if run.save_fn is not None:
                    run.save_fn(model, self.stage_dir)
                else:
                    ckpt.save_pretrained_atomic(model, self.tokenizer, self.stage_dir)
                ckpt.commit_resume(self.stage_dir, run.state, *(() if run.skeleton else
                                                                (run.model, run.optimizer, run.scaler)))
        except OSError as e:  # a full disk, a vanished mount: say so; the swap never happened
            raise SystemExit(f"could not write the step-{run.state['step']} checkpoint to {self.stage_dir}: {e}. "
                             f"The last complete checkpoint there is kept; free space and rerun with --resume.") from e
        barrier()

    def close(self):
        cleanup()


_UNSET = object()


def apply_method_defaults(parser, argv, method_defaults: dict) -> argparse.Namespace:
    """Parse argv (or take a parsed Namespace) and give the chosen --method its own defaults for the flags the user
    did not write (GRPO starts from `reason` and reads prompts, not the SFT chats the reasoning SFT reads); a flag
    written out wins even when it equals the stage's default (--method grpo --from dpo)."""
    names = {name for values in method_defaults.values() for name in values}
    if isinstance(argv, argparse.Namespace):  # parsed elsewhere: a value equal to the stage's default counts as unset
        args = argv
        unset = {name for name in names if getattr(args, name) == parser.get_default(name)}
    else:  # argparse fills a default in only where the namespace has no value yet: a placeholder marks the unwritten
        args = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(names, _UNSET)))
        unset = {name for name in names if getattr(args, name) is _UNSET}
        for name in unset:
            setattr(args, name, parser.get_default(name))
    for name, value in method_defaults.get(args.method, {}).items():
        if name in unset:
            setattr(args, name, value)
    return args


def describe_method_defaults(parser, method_defaults: dict) -> argparse.ArgumentParser:
    """Say in --help which defaults a --method changes (the table apply_method_defaults applies)."""
    flag = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    lines = [f"  --method {method}: " + ", ".join(f"{flag[name]} {value}" for name, value in values.items())
             for method, values in method_defaults.items()]
    parser.epilog = "defaults that depend on --method (used unless the flag is given):\n" + \
        "\n".join(lines)
    return parser


def stage_main(stage: str, build_parser, run, argv=None) -> dict:
    """Shared entry point: parse args (or take an already parsed Namespace), build the Trainer, run the stage, tear
    the process group down."""
    args = argv if isinstance(argv, argparse.Namespace) else build_parser().parse_args(argv)
    trainer = Trainer(args, getattr(args, "save_as", None) or stage)
    try:
        return run(trainer, args)
    finally:
        trainer.close()


__all__ = ["Trainer", "add_train_args", "apply_method_defaults", "describe_method_defaults", "lm_loss",
           "count_label_tokens", "lr_at", "param_groups",
           "ShardedBatchSampler", "stage_main"]
