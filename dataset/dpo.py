"""DPODataset: {"chosen": [...], "rejected": [...]} jsonl; both chats share the prompt, the last reply differs."""

import torch

from .chat import check_messages, normalize_chat, row_chooses, with_empty_think
from .jsonl import BadLineError
from .sft import SFTDataset, pad_collate, report_lost, unmappable


def check_preference(obj) -> None:
    if not isinstance(obj, dict) or "chosen" not in obj or "rejected" not in obj:
        raise BadLineError('missing key "chosen" or "rejected"')
    check_messages(obj["chosen"], "chosen")
    check_messages(obj["rejected"], "rejected")
    if obj["chosen"][:-1] != obj["rejected"][:-1]:
        raise BadLineError("chosen and rejected do not share the same prompt messages")


class DPODataset(SFTDataset):
    """Each row: the chosen and the rejected chat encoded with labels on the final reply (+ its eos) only. Reading,
    lengths and adaptive thinking are SFTDataset's; only the schema and the encoding of a row differ."""

    check_row = staticmethod(check_preference)

    def __init__(self, path, tokenizer, max_seq_len: int = 1024, **kwargs):
        super().__init__(path, tokenizer, max_seq_len, **kwargs)

    def __getitem__(self, i):
        row, pair = self.rows[i], []
        empty_think = row_chooses(self.seed, i, self.empty_think_ratio)  # both sides alike: the same prompt
        for key in ("chosen", "rejected"):
            try:
                messages, tools = normalize_chat(row[key], key)
                messages = with_empty_think(messages) if empty_think else messages
                pair.append(self.encoder.encode(messages, tools, self.max_seq_len, last_reply_only=True))
            except BadLineError as e:
                pair.append(unmappable(self.rows, i, e))
        chosen, rejected = pair
        report_lost(self.rows, i, chosen.get("lost", rejected.get("lost")))  # one warning per row, not per side
        return {"index": i, "chosen": chosen, "rejected": rejected}


def dpo_collate(rows, pad_id: int = 0) -> dict:
    """One batch of 2B rows: the B chosen chats, then the B rejected ones, right-padded to the longest."""
    batch = pad_collate([r["chosen"] for r in rows] + [r["rejected"] for r in rows], pad_id)
    batch["index"] = torch.tensor([r["index"] for r in rows])
    return batch
