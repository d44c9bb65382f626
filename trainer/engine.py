"""The one training engine: every stage script builds a dataset and (optionally) a loss, then calls Trainer.fit.

What lives here, once: process group and device, precision (autocast + GradScaler for fp16), fused AdamW with decay
groups, warmup + cosine LR per optimizer step, gradient accumulation with no_sync, clipping, NaN/Inf step skipping
(on the device: no host sync per step),
exact resume (weights, optimizer, scaler, RNG, data position), checkpoints, tqdm / wandb / SwanLab logging and the
loss-curve PNG.
"""

import argparse
import logging
import math
import time
from contextlib import nullcontext
from itertools import islice
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from dataset.sft import EMPTY_THINK_RATIO
from model import TOKENIZER_DIR, MicroLMConfig, MicroLMForCausalLM
from model.families import load_pretrained, model_type

from . import checkpoint as ckpt
from . import report
from .distributed import barrier, cleanup, fast_dtype, init_distributed
from .evaluation import HeldOut, Rows, split_rows
from .tracking import Tracker, plot_loss

log = logging.getLogger("trainer")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def add_train_args(parser: argparse.ArgumentParser, *, epochs: int, batch_size: int, learning_rate: float,
                   max_seq_len: int, data_path: str, init_from: str | None = None, preset: str = "26m",
                   accumulation_steps: int = 1, save_interval: int = 1000) -> argparse.ArgumentParser:
    """The flags every stage shares (MiniMind's spellings where they exist); defaults are the stage's own."""
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
    a("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0 = run all epochs)")
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
    a("--logger", default="none", choices=["none", "wandb", "swanlab"], help="experiment tracker")
    a("--use_wandb", action="store_true", help="same as --logger wandb")
    a("--wandb_project", default="LLM_implementation", help="wandb / SwanLab project name")
    a("--image_dir", default="images", help="where the loss-curve PNG is written")
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
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"],
                reduction="none")
    ce = out.loss
    loss = (ce * batch["weights"][:, 1:]).sum() if "weights" in batch else ce.sum()
    if out.aux_loss is not None:
        loss = loss + out.aux_loss * count_label_tokens(batch)
    return loss, {}


def count_label_tokens(batch) -> torch.Tensor:
    if "weights" in batch:
        return batch["weights"][:, 1:].sum()
    return (batch["labels"][:, 1:] != -100).sum()


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


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------------------------

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
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: ~free speed, fp32 checkpoints unchanged
            torch.backends.cudnn.allow_tf32 = True
        self.autocast = (nullcontext() if self.dtype == torch.float32
                         else torch.autocast(self.device.type, dtype=self.dtype))
        self.stage_dir = Path(args.out_dir) / stage
        self._check_writable()
        args.tokenizer = str(ckpt.resolve_tokenizer(args.tokenizer, args.init_from, args.out_dir, TOKENIZER_DIR))
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

    # -- model --------------------------------------------------------------------------------------------------------
    def build_model(self, **overrides) -> MicroLMForCausalLM:
        """From `--from` (a stage name or folder; strict: any mismatch is an error) or a fresh `--preset`."""
        args = self.args
        if args.init_from and str(args.init_from).lower() != "none":
            path = ckpt.resolve_checkpoint(args.init_from, args.out_dir)
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

    # -- training -----------------------------------------------------------------------------------------------------
    def fit(self, model, dataset, collate_fn=None, loss_fn=lm_loss, count_fn=count_label_tokens, save_fn=None,
            shuffle: bool = True, curve: str = "loss", eval_dataset=None, repeat: int = 1) -> dict:
        """Train `model` on `dataset`; returns a summary (steps, losses, seconds) for the demo runner.

        loss_fn(model, batch) -> (summed loss, {name: summed metric}); count_fn(batch) -> how many units those
        sums cover (label tokens by default, pairs for DPO); metrics are logged as per-unit means. The engine divides by the count over the whole optimizer step
        and all ranks, so batch 2 x accumulation 2 == batch 4 x accumulation 1 == 2 ranks x batch 2, whatever the
        padding. save_fn(model, folder) replaces the default save_pretrained (LoRA saves only its adapter). curve: what
        the PNG shows, "loss" or one of loss_fn's metrics (GRPO: "reward"; its loss hovers near 0 by construction).
        eval_dataset (see `split`): scored every --eval_interval steps, at the start and at the end (evaluation.py).
        repeat: optimizer steps taken on each window of micro-batches (GRPO's and PPO's epochs over one rollout batch:
        count_fn runs once per window, where they sample, and loss_fn once per micro-batch and step).
        """
        args, env = self.args, self.env
        A, B, W = args.accumulation_steps, args.batch_size, env.world_size
        lengths = getattr(dataset, "lengths", None) if args.group_by_length else None
        sampler = ShardedBatchSampler(len(dataset), B, W, env.rank, args.seed, shuffle, lengths)
        steps_per_epoch = sampler.micro_per_epoch // A
        if steps_per_epoch == 0:
            raise ValueError(f"{len(dataset)} rows are fewer than one optimizer step needs "
                             f"({W} ranks x batch {B} x accumulation {A})")
        total_steps = min(args.max_steps or 10 ** 12, args.epochs * steps_per_epoch * repeat)
        warmup = args.warmup_steps if args.warmup_steps >= 0 else max(1, total_steps // 100)
        # the loader's own generator: iter(loader) draws the workers' base seed from it, not from the global RNG that
        # --resume restores (that draw shifted every later dropout mask and sampled token after a resume)
        loader_rng = torch.Generator()
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=args.num_workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=False, generator=loader_rng)

        trainable = [p for p in model.parameters() if p.requires_grad]
        # a model with several parts (PPO's policy + value model) may give its own groups, each with an lr_scale
        groups = (model.param_groups(args.weight_decay) if hasattr(model, "param_groups")
                  else param_groups(model, args.weight_decay))
        optimizer = torch.optim.AdamW(groups, lr=args.learning_rate,
                                      betas=(0.9, 0.95), fused=args.fused_adamw or None)
        scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None

        state = {"step": 0, "epoch": 0, "row": 0, "history": [], "metric_history": [], "eval_history": [],
                 "run_id": None, "bad_steps": 0}
        resume_path = ckpt.find_resume(self.stage_dir) if args.resume else None
        if resume_path is not None:
            state = ckpt.load_resume(resume_path, model, optimizer, scaler, env.rank)
            if state["row"] % (W * B):
                log.warning("resume position %d is not a multiple of %d rows per micro-step: rounding down",
                            state["row"], W * B)
            self.log(f"resumed from {resume_path} at step {state['step']} (epoch {state['epoch']}, "
                     f"row {state['row']})")
        elif args.resume:
            self.log(f"no resume state in {self.stage_dir / 'resume'}; starting from the beginning")
        if resume_path is None and env.rank > 0:
            # each rank its own stream for dropout and sampling: every rank had seeded args.seed, so their masks were
            # the same. Rank 0 (and so a single process) keeps the stream it always had; a resumed run restores each
            # rank's saved state instead
            torch.manual_seed(args.seed + 1_000_003 * env.rank)
        held = None
        if eval_dataset is not None:
            held = HeldOut(eval_dataset, collate_fn, loss_fn, count_fn, self.tokenizer, env, B, args.eval_batches,
                           self.autocast, model.config.vocab_size, token_level=count_fn is count_label_tokens)

        net = model
        if args.grad_checkpoint:  # non-reentrant: works with frozen inputs (LoRA) and keeps dropout's RNG per block
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            n = sum(getattr(m, "gradient_checkpointing", False) for m in model.modules())
            self.log(f"activation checkpointing: {n} blocks recompute in the backward pass")
        if args.compile:
            net = torch.compile(net)
        if W > 1:
            # the only buffers are the RoPE tables, computed identically on every rank: broadcasting them (~16 MiB
            # for 26m) before every synced forward is pure traffic
            net = DistributedDataParallel(net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                          broadcast_buffers=False)

        tracker = None
        if env.is_main:
            tracker = Tracker(args.logger, args.wandb_project, f"{self.stage}-{time.strftime('%m%d-%H%M')}",
                              vars(args), self.stage_dir, state.get("run_id"))
            state["run_id"] = tracker.run_id
        bar = tqdm(total=total_steps, initial=state["step"], desc=self.stage, disable=not env.is_main,
                   dynamic_ncols=True)

        t0, tokens_seen, last_metrics = time.time(), 0, {}
        warm = None  # (time, tokens) after the first step: throughput without start-up and compilation
        pending, empty_rows = [], torch.zeros((), device=self.device)
        # non-finite steps: counted on the device, looked at (one sync) when logging or saving
        bad_run, unchecked = torch.tensor(state["bad_steps"], device=self.device), []
        done = state["step"] >= total_steps
        if held is not None and state["step"] == 0:
            self._evaluate(held, model, state, tracker)
        model.train()
        for epoch in range(state["epoch"], args.epochs):
            if done:
                break
            sampler.set_epoch(epoch, state["row"] if epoch == state["epoch"] else 0)
            state["epoch"], state["row"] = epoch, state["row"] if epoch == state["epoch"] else 0
            loader_rng.manual_seed(args.seed + epoch)  # same worker seeds per epoch, resumed or not, any world size
            batches = iter(loader)
            reuse = 0  # how many more steps the current window serves (repeat > 1)
            while state["step"] < total_steps:
                if reuse == 0:
                    micro = [to_device(b, self.device) for b in islice(batches, A)]
                    if len(micro) < A:
                        break  # an incomplete accumulation window at the end of the epoch is dropped
                    counts = torch.stack([torch.as_tensor(count_fn(b), device=self.device) for b in micro]).float()
                    total = counts.sum()
                    if W > 1:
                        dist.all_reduce(total)
                    reuse = repeat
                reuse -= 1
                step_loss, step_metrics = torch.zeros((), device=self.device), {}
                for i, b in enumerate(micro):
                    sync = nullcontext() if W == 1 or i == A - 1 else net.no_sync()
                    with sync:
                        with self.autocast:
                            loss_sum, metrics = loss_fn(net, b)
                        loss = loss_sum / total.clamp(min=1)
                        step_loss += loss.detach()
                        for k, v in metrics.items():  # summed like the loss, so normalised the same way
                            step_metrics[k] = step_metrics.get(k, 0) + v.detach().float() / total.clamp(min=1)
                        loss = loss * W  # DDP averages gradients over ranks; the normaliser is already global
                        (scaler.scale(loss) if scaler else loss).backward()
                    if "labels" in b:
                        empty_rows += ((b["labels"] != -100).sum(1) == 0).sum()
                    tokens_seen += b["input_ids"].numel() if "input_ids" in b else 0

                lr = lr_at(state["step"], total_steps, args.learning_rate, warmup, args.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                if scaler:
                    scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip or float("inf"))
                finite = torch.isfinite(grad_norm)  # the same on every rank: gradients are already all-reduced
                self._optimizer_step(optimizer, scaler, finite)
                optimizer.zero_grad(set_to_none=True)
                bad_run = torch.where(finite, torch.zeros_like(bad_run), bad_run + 1)
                state["step"] += 1
                if reuse == 0:  # the window is done: a resume starts at the next one
                    state["row"] += A * W * B
                unchecked.append((state["step"], bad_run))
                pending.append((step_loss, step_metrics))
                bar.update(1)
                t_step = time.time()
                if warm is None:
                    warm = (t_step, tokens_seen)

                last = state["step"] >= total_steps
                log_now = state["step"] % args.log_interval == 0 or last or state["step"] == args.stop_at_step
                save_now = state["step"] % args.save_interval == 0 or last or state["step"] == args.stop_at_step
                if log_now or save_now:
                    self._check_finite(unchecked, state, scaler)
                if log_now:
                    last_metrics = self._flush(pending, state, lr, grad_norm, tracker, bar, t0, tokens_seen)
                if held is not None and (state["step"] % args.eval_interval == 0 or last):
                    self._evaluate(held, model, state, tracker)
                if save_now:
                    self._save(model, optimizer, scaler, state, save_fn)
                if state["step"] == args.stop_at_step:
                    self.log(f"stopping at step {state['step']} (--stop_at_step)")
                    done = True
                    break
            else:
                done = True
            if not done:
                state["epoch"], state["row"] = epoch + 1, 0
        bar.close()

        empty = int(empty_rows.item())
        if W > 1:
            t = torch.tensor(empty, device=self.device)
            dist.all_reduce(t)
            empty = int(t)
        bad_lines = len(getattr(getattr(dataset, "rows", getattr(dataset, "docs", None)), "bad_lines", []))
        if bad_lines:
            self.log(f"{args.data_path}: {bad_lines} malformed line(s) were skipped (see the warnings above)")
        if empty:
            self.log(f"{empty} row(s) had no trainable token (e.g. the reply was truncated away) and taught nothing")
        history = state["history"]
        seconds = time.time() - t0
        if env.is_main and history:
            png = Path(args.image_dir) / f"{self.stage}_{curve}.png"
            if curve == "loss":
                plot_loss(history, png, f"{self.stage} loss",
                          held_out=[(st, e["loss"]) for st, e in state.get("eval_history", [])])
            else:  # logged as means over each --log_interval
                plot_loss([(s, m[curve]) for s, m in state.get("metric_history", []) if curve in m], png,
                          f"{self.stage} {curve}", ylabel=curve)
            self.log(f"loss {history[0][1]:.3f} -> {history[-1][1]:.3f} over {state['step']} steps; curve: {png}")
        if tracker:
            tracker.finish()
        evaluated = state["eval_history"][-1][1] if state.get("eval_history") else {}
        if env.is_main and history:
            report.append(args.out_dir, {
                "kind": "stage", "stage": self.stage, "data": str(args.data_path), "rows": len(dataset),
                # tokens fed as input_ids; None where the loss makes its own (GRPO's rollouts)
                "model": str(args.init_from or args.preset or args.default_preset), "steps": state["step"], "tokens": tokens_seen * W or None,
                "seconds": seconds, "tokens_per_s": tokens_seen * W / max(seconds, 1e-9) if tokens_seen else None,
                "train_loss": history[-1][1], "eval_loss": evaluated.get("loss"), "eval_bpb": evaluated.get("bpb"),
                "eval_data": args.eval_data or (f"{args.eval_split:.0%} of the data" if args.eval_split else None)},
                image_dir=args.image_dir)
        barrier()
        steady = (tokens_seen - warm[1]) * W / (t_step - warm[0]) if warm and t_step > warm[0] else None
        return {"steps": state["step"], "history": history, "seconds": seconds, "metrics": last_metrics,
                "metric_history": state.get("metric_history", []), "eval_history": state.get("eval_history", []),
                "eval": evaluated or None,
                "tokens": tokens_seen * W, "tokens_per_s_after_first_step": steady,
                "first_loss": history[0][1] if history else None, "last_loss": history[-1][1] if history else None}

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

    def _check_finite(self, unchecked, state, scaler):
        """Report the skipped (non-finite) steps since the last look; stop after --max_bad_steps in a row."""
        runs = torch.stack([run for _, run in unchecked]).tolist()
        steps = [step for step, _ in unchecked]
        unchecked.clear()
        limit = self.args.max_bad_steps if not scaler else max(self.args.max_bad_steps, 30)
        for step, run in zip(steps, runs):
            if run:
                self.log(f"step {step}: non-finite loss or gradient, update skipped ({run} in a row)")
            if run >= limit:
                raise RuntimeError(f"{run} non-finite steps in a row at step {step}: stopping; the last good "
                                   f"checkpoint in {self.stage_dir} is kept. Lower --learning_rate or check the data.")
        state["bad_steps"] = runs[-1]

    def _flush(self, pending, state, lr, grad_norm, tracker, bar, t0, tokens_seen) -> dict:
        """Move the per-step losses and the loss_fn's metrics to the host (the only regular sync besides the finite
        check), log them, and return the metrics' means over the interval."""
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
        elapsed = time.time() - t0
        tok_s = tokens_seen * self.env.world_size / max(elapsed, 1e-9)
        bar.set_postfix(loss=f"{values[-1]:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
        if tracker:
            tracker.log({"loss": values[-1], "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tok_s,
                         "epoch": state["epoch"], **metrics}, step=state["step"])
        return metrics

    def _evaluate(self, held, model, state, tracker):
        result = held.run(model)
        state.setdefault("eval_history", []).append([state["step"], result])
        bpb = f", {result['bpb']:.4f} bits per byte" if "bpb" in result else ""
        self.log(f"step {state['step']}: held-out loss {result['loss']:.4f}{bpb} ({result['tokens']:,} "
                 f"{'tokens' if 'bpb' in result else 'units'} of {held.rows} rows)")
        if tracker:
            tracker.log({f"eval/{k}": v for k, v in result.items()}, step=state["step"])

    def _save(self, model, optimizer, scaler, state, save_fn):
        try:
            ckpt.write_rank_rng(self.stage_dir, self.env.rank)
            barrier()
            if self.env.is_main:
                if save_fn is not None:
                    save_fn(model, self.stage_dir)
                else:
                    ckpt.save_pretrained_atomic(model, self.tokenizer, self.stage_dir)
                ckpt.commit_resume(self.stage_dir, model, optimizer, scaler, state)
        except OSError as e:  # a full disk, a vanished mount: say so; the swap never happened
            raise SystemExit(f"could not write the step-{state['step']} checkpoint to {self.stage_dir}: {e}. The "
                             f"last complete checkpoint there is kept; free space and rerun with --resume.") from e
        barrier()

    def close(self):
        cleanup()


def stage_main(stage: str, build_parser, run, argv=None) -> dict:
    """Shared entry point: parse args (or take an already parsed Namespace), build the Trainer, run the stage, tear
    the process group down."""
    args = argv if isinstance(argv, argparse.Namespace) else build_parser().parse_args(argv)
    trainer = Trainer(args, getattr(args, "save_as", None) or stage)
    try:
        return run(trainer, args)
    finally:
        trainer.close()


__all__ = ["Trainer", "add_train_args", "lm_loss", "count_label_tokens", "lr_at", "param_groups",
           "ShardedBatchSampler", "stage_main"]
