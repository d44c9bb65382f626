"""SFTDataset: {"conversations": [...]} jsonl rendered with the tokenizer's chat template, loss on what the assistant
writes (reasoning, tool calls, reply, eos); tool calls, tool results and reasoning_content included (dataset/chat.py)."""

import logging

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .chat import (ChatEncoder, check_conversations, describe_lost, normalize_chat, row_chooses, with_empty_think,
                   with_system_prompt)
from .jsonl import BadLineError, JsonlFile, warn_row

log = logging.getLogger(__name__)
EMPTY_THINK_RATIO = 0.2  # share of rows without reasoning that get the (labelled) empty think block


def encode_chat(tokenizer, messages, max_seq_len: int, last_reply_only: bool = False, mark=(), tools=None) -> dict:
    """One chat (raw rows are normalised first) -> input_ids and labels; see ChatEncoder.encode."""
    messages, found = normalize_chat(messages)
    return ChatEncoder(tokenizer).encode(messages, tools or found, max_seq_len, last_reply_only, mark)


def unmappable(rows, i, error) -> dict:
    """A row the template cannot be mapped for: reported with file:line and trained on as nothing (all labels
    -100; the engine counts such rows at the end), never a crash inside the DataLoader."""
    log.warning("skipping row %s: %s", rows.where(i), error)
    return {"input_ids": torch.zeros(1, dtype=torch.long), "labels": torch.full((1,), -100, dtype=torch.long)}


def report_lost(rows, i, lost) -> None:
    """Name row i if its chat template left a field out (`lost`: dataset/chat.py's counts; the engine counts them
    all at the end)."""
    if lost is not None and any(lost):
        warn_row("lost fields", rows.where(i), f"the chat template does not render {describe_lost(lost)}; the row "
                 "goes on without it")


class SFTDataset(Dataset):
    """empty_think_ratio: adaptive thinking (MiniMind's way): in that share of rows, picked by a seeded hash of the
    row index, assistant turns without reasoning get the empty think block `<think>\\n\\n</think>\\n\\n` in front of
    their reply; the other rows get none. The model learns to answer straight away or to think first.
    system_prompt_ratio: in that share of rows (another seeded pick), a chat without a system message gets a random
    one of dataset/chat.py's SYSTEM_PROMPTS (MiniMind's 20%)."""

    check_row = staticmethod(check_conversations)  # the row schema; JsonlFile reports rows that fail it

    def __init__(self, path, tokenizer, max_seq_len: int = 512, strict: bool = False, verbose: bool = True,
                 empty_think_ratio: float = EMPTY_THINK_RATIO, seed: int = 0, system_prompt_ratio: float = 0.0):
        self.tokenizer, self.max_seq_len = tokenizer, max_seq_len
        self.empty_think_ratio, self.seed, self.system_prompt_ratio = empty_think_ratio, seed, system_prompt_ratio
        self.rows = JsonlFile(path, self.check_row, strict=strict, verbose=verbose)
        self.encoder = ChatEncoder(tokenizer)

    @property
    def lengths(self):
        """Line sizes in bytes, for length-grouped batches (the engine's --group_by_length)."""
        return self.rows.sizes

    def __len__(self):
        return len(self.rows)

    def messages(self, i, key="conversations"):
        """Row i's normalised messages (with the adaptive-thinking choice applied) and its tools."""
        messages, tools = normalize_chat(self.rows[i][key], key)
        if row_chooses(self.seed, i, self.empty_think_ratio):
            messages = with_empty_think(messages)
        if row_chooses(f"{self.seed}:system", i, self.system_prompt_ratio):
            messages = with_system_prompt(messages, self.seed, i)
        return messages, tools

    def __getitem__(self, i):
        try:
            messages, tools = self.messages(i)
            item = self.encoder.encode(messages, tools, self.max_seq_len)
        except BadLineError as e:
            return unmappable(self.rows, i, e)
        report_lost(self.rows, i, item.get("lost"))
        return item


def pad_id_of(tokenizer) -> int:
    """The id padding is written with: the tokenizer's pad token, else 0 (padding is masked out either way)."""
    return tokenizer.pad_token_id or 0


def pack_rows(lengths, capacity: int) -> list[list[int]]:
    """First-fit decreasing: the indices of `lengths` grouped into bins whose sums stay within `capacity` (an item
    longer than that gets a bin of its own). Few bins, little room left in each."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def pack_collate(rows, pad_id: int = 0, max_seq_len: int = 512) -> dict:
    """The micro-batch's conversations packed into as few rows of at most max_seq_len tokens as they fit in, with
    position ids restarting at each conversation: the model keeps each one to itself (model.document_mask), so every
    conversation's loss is what it would be alone, and the padding pad_collate computes is gone. The same rows per
    step as pad_collate (same sampler, steps, resume and DDP); only the tensors' shape differs."""
    bins = pack_rows([len(r["input_ids"]) for r in rows], max_seq_len)
    packed = []
    for b in bins:
        row = {"input_ids": torch.cat([rows[i]["input_ids"] for i in b]),
               # a conversation's first label is never a target alone; packed, it would follow the previous one
               "labels": torch.cat([F.pad(rows[i]["labels"][1:], (1, 0), value=-100) for i in b])}
        row["position_ids"] = torch.cat([torch.arange(len(rows[i]["input_ids"])) for i in b])
        if any("weights" in rows[i] for i in b):
            row["weights"] = torch.cat([F.pad(rows[i].get("weights", torch.zeros(len(rows[i]["labels"])))[1:], (1, 0))
                                        for i in b])
        packed.append(row)
    batch = pad_collate(packed, pad_id)
    n = batch["input_ids"].shape[1]
    # a row's padding tail is a document of its own (positions from 0; its labels are -100)
    batch["position_ids"] = torch.stack([torch.cat([r["position_ids"], torch.arange(n - len(r["position_ids"]))])
                                         for r in packed])
    batch.update(count_lost(rows))
    # conversations with nothing to learn (reply truncated away) no longer have rows of their own: counted here
    batch["empty_rows"] = torch.tensor(sum(int((r["labels"] == -100).all()) for r in rows))
    return batch


def count_lost(rows) -> dict:
    """{"lost": rows that lost each LOSABLE field} when any row did (dataset/chat.py's lost_fields)."""
    lost = [r["lost"] for r in rows if "lost" in r]
    return {"lost": (torch.stack(lost) > 0).long().sum(0)} if lost else {}


def pad_collate(rows, pad_id: int = 0) -> dict:
    """Right-pad a list of {input_ids, labels[, weights]} to the longest row of the batch (not to max_seq_len)."""
    n = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, :len(r["input_ids"])] = r["input_ids"]
        labels[i, :len(r["labels"])] = r["labels"]
    batch = {"input_ids": input_ids, "labels": labels, "real_tokens": sum(len(r["input_ids"]) for r in rows),
             **count_lost(rows)}
    if any("weights" in r for r in rows):
        batch["weights"] = torch.zeros((len(rows), n))
        for i, r in enumerate(rows):
            if "weights" in r:
                batch["weights"][i, :len(r["weights"])] = r["weights"]
    return batch
