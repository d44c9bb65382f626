"""DPODataset: {"chosen": [...], "rejected": [...]} jsonl; both chats share the prompt, the last reply differs."""

import torch
from torch.utils.data import Dataset

from .jsonl import BadLineError, JsonlFile, check_messages
from .sft import encode_chat, pad_collate


def check_preference(obj) -> None:
    if not isinstance(obj, dict) or "chosen" not in obj or "rejected" not in obj:
        raise BadLineError('missing key "chosen" or "rejected"')
    check_messages(obj["chosen"], "chosen")
    check_messages(obj["rejected"], "rejected")
    if obj["chosen"][:-1] != obj["rejected"][:-1]:
        raise BadLineError("chosen and rejected do not share the same prompt messages")


class DPODataset(Dataset):
    """Each row: the chosen and the rejected chat encoded with labels on the final reply (+ its eos) only."""

    def __init__(self, path, tokenizer, max_seq_len: int = 1024, strict: bool = False, verbose: bool = True):
        self.tokenizer, self.max_seq_len = tokenizer, max_seq_len
        self.rows = JsonlFile(path, check_preference, strict=strict, verbose=verbose)

    @property
    def lengths(self):
        """Line sizes in bytes, for length-grouped batches (the engine's --group_by_length)."""
        return self.rows.sizes

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        chosen = encode_chat(self.tokenizer, row["chosen"], self.max_seq_len, last_reply_only=True)
        rejected = encode_chat(self.tokenizer, row["rejected"], self.max_seq_len, last_reply_only=True)
        return {"index": i, "chosen": chosen, "rejected": rejected}


def dpo_collate(rows, pad_id: int = 0) -> dict:
    """One batch of 2B rows: the B chosen chats, then the B rejected ones, right-padded to the longest."""
    batch = pad_collate([r["chosen"] for r in rows] + [r["rejected"] for r in rows], pad_id)
    batch["index"] = torch.tensor([r["index"] for r in rows])
    return batch
