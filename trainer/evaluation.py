"""Held-out evaluation during training (--eval_data / --eval_split, --eval_interval, --eval_batches).

Token-level stages (pretrain, SFT, KD, LoRA, reason): the cross-entropy on exactly the tokens the stage trains on
(labels != -100; no MoE balance term, no tag weights) and bits per byte,

    bpb = (nats summed over those tokens) / ln 2 / (UTF-8 bytes those tokens decode to),

which compares models whose tokenizers differ (ours against MiniMind's). Special tokens stand for no text: they
count in the loss but are left out of bpb, nats and bytes both (nanochat does the same). Other stages (DPO) report
their own loss and metrics on held-out rows. Each rank evaluates its own slice; the sums are all-reduced.

Evaluation leaves training untouched: no gradients, dropout off, its own loader generator (so no draw from the
global RNG that dropout and sampling use), and the model put back in training mode.
"""

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from common.distributed import to_device


def _byte_decoder() -> dict:
    """GPT-2's byte-level alphabet: the printable character that stands for each of the 256 bytes, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in chars.items()}


def token_byte_lengths(tokenizer, vocab_size: int | None = None) -> torch.Tensor:
    """(vocab,) UTF-8 bytes each token id decodes to; 0 for special tokens and for ids the tokenizer lacks."""
    size = max(vocab_size or 0, len(tokenizer))
    out = torch.zeros(size, dtype=torch.long)
    decoder = _byte_decoder()
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} | set(tokenizer.all_special_ids)
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if piece is None or i in special:
            continue
        if all(c in decoder for c in piece):  # byte-level BPE (ours, MiniMind's, Qwen's, Llama 3's): one char a byte
            out[i] = len(piece)
        else:  # other vocabularies (sentencepiece's "▁", added non-special tokens)
            out[i] = len(tokenizer.convert_tokens_to_string([piece]).encode("utf-8"))
    return out


class Rows(Subset):
    """Some rows of a dataset, keeping what the engine reads off it (row lengths, the malformed-line count)."""

    def __init__(self, dataset, indices):
        super().__init__(dataset, list(indices))
        lengths = getattr(dataset, "lengths", None)
        self.lengths = None if lengths is None else np.asarray(lengths)[self.indices]
        for name in ("rows", "docs"):
            if hasattr(dataset, name):
                setattr(self, name, getattr(dataset, name))


def split_rows(n: int, fraction: float, seed: int) -> tuple:
    """(training indices, held-out indices): a seeded `fraction` of range(n) held out, at least one row each."""
    if not 0 < fraction < 1:
        raise ValueError(f"--eval_split must be between 0 and 1, got {fraction}")
    held = min(n - 1, max(1, round(n * fraction)))
    if n < 2:
        raise ValueError(f"{n} row(s) cannot be split into training and held-out rows")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    return sorted(order[held:]), sorted(order[:held])


class HeldOut:
    """One held-out set and how to score a model on it; `run(model)` -> {"loss", "bpb"?, "tokens", ...}.
    token_level: the stage counts its loss in label tokens (cross-entropy and bpb); else loss_fn per count_fn unit."""

    def __init__(self, dataset, collate_fn, loss_fn, count_fn, tokenizer, env, batch_size: int, max_batches: int,
                 autocast, vocab_size: int, token_level: bool = True, lockstep: bool = False):
        self.env, self.autocast = env, autocast
        self.loss_fn, self.count_fn, self.token_level = loss_fn, count_fn, token_level
        # the rows in file order, world x batch per step, rank r taking its slice (as in training); the last step
        # may be short, and a rank whose slice is empty just stops early: the sums meet in one all-reduce
        G, r, n = batch_size * env.world_size, env.rank, len(dataset)
        slices = [list(range(s + r * batch_size, min(s + (r + 1) * batch_size, n))) for s in range(0, n, G)]
        self.batches = [b for b in slices[:max_batches or None] if b]
        # lockstep (--fsdp: every forward gathers shards from all ranks): a rank with fewer batches runs as many
        # forwards as the others, on rows it counts zero times
        self.real = len(self.batches)
        if lockstep and n:
            most = min(len(slices), max_batches or len(slices))
            self.batches += [list(range(min(batch_size, n)))] * (most - self.real)
        # own generator: iterating a DataLoader draws its base seed from it, never from the global RNG
        self.loader = DataLoader(dataset, batch_sampler=self.batches, collate_fn=collate_fn, num_workers=0,
                                 generator=torch.Generator())
        self.byte_lengths = token_byte_lengths(tokenizer, vocab_size).to(env.device)
        self.rows = len(dataset)

    @torch.no_grad()
    def run(self, model) -> dict:
        was_training = model.training
        model.eval()
        device = self.env.device
        # loss sum, loss count, nats over text tokens, bytes of text tokens, then loss_fn's metric sums
        sums, names = torch.zeros(4, dtype=torch.float64, device=device), []
        for i, batch in enumerate(self.loader):
            batch = to_device(batch, device)
            with self.autocast:
                if self.token_level:
                    part = self._token_sums(model, batch)
                else:
                    loss, metrics = self.loss_fn(model, batch)
                    names = names or sorted(metrics)
                    part = torch.stack([loss.double(), torch.as_tensor(self.count_fn(batch), device=device).double(),
                                        *(torch.zeros((), dtype=torch.float64, device=device),) * 2,
                                        *(metrics[n].double() for n in names)])
            if i >= self.real:  # a lockstep filler
                part = part * 0
            if sums.numel() < part.numel():
                sums = torch.cat([sums, sums.new_zeros(part.numel() - sums.numel())])
            sums += part
        if self.env.world_size > 1:
            # a rank with no held-out rows (fewer rows than ranks) never learnt the metric names: same sizes first
            size = torch.tensor([sums.numel()], device=device)
            dist.all_reduce(size, op=dist.ReduceOp.MAX)
            sums = torch.cat([sums, sums.new_zeros(int(size) - sums.numel())])
            dist.all_reduce(sums)
        loss, count, nats, nbytes, *metric_sums = sums.tolist()
        out = {"loss": loss / max(count, 1), "tokens": int(count)}
        if nbytes:
            out["bpb"] = nats / math.log(2) / nbytes
        out.update({n: v / max(count, 1) for n, v in zip(names, metric_sums)})
        model.train(was_training)
        return out

    def _token_sums(self, model, batch) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       position_ids=batch.get("position_ids")).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100,
                             reduction="none").double()
        mask = labels.reshape(-1) != -100
        nbytes = self.byte_lengths[labels.reshape(-1).clamp(min=0)] * mask
        return torch.stack([ce.sum(), mask.sum().double(), (ce * (nbytes > 0)).sum(), nbytes.sum().double()])
