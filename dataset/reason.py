"""Stage 6 data: reasoning SFT rows with extra loss weight on the think/answer tags, and GRPO prompts."""

import torch
from torch.utils.data import Dataset

from .jsonl import JsonlFile, check_conversations
from .sft import SFTDataset, encode_chat

REASON_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


class ReasonDataset(SFTDataset):
    """SFTDataset plus "weights": 0 off the labels, `tag_weight` on the tokens that spell a tag inside a reply, 1 on
    every other reply token. Tags are found as whole strings in the reply text and mapped to the tokens covering
    them, so a tag split into BPE pieces is weighted as a whole and a stray "<" elsewhere is not."""

    def __init__(self, path, tokenizer, max_seq_len: int = 1024, tag_weight: float = 10.0, tags=REASON_TAGS,
                 strict: bool = False, verbose: bool = True):
        super().__init__(path, tokenizer, max_seq_len, strict=strict, verbose=verbose)
        self.tag_weight, self.tags = float(tag_weight), tuple(tags)

    def __getitem__(self, i):
        item = encode_chat(self.tokenizer, self.rows[i]["conversations"], self.max_seq_len, mark=self.tags)
        marked = item.pop("marked")
        item["weights"] = torch.where(item["labels"] == -100, 0.0, torch.where(marked, self.tag_weight, 1.0))
        return item


class PromptDataset(Dataset):
    """GRPO prompts from {"conversations": [...]} rows: the prompt is every message before the last assistant
    reply, rendered with the generation prompt; the reference is that reply (a reward may read its <answer>)."""

    def __init__(self, path, tokenizer, max_prompt_len: int = 256, strict: bool = False, verbose: bool = True):
        self.tokenizer, self.max_prompt_len = tokenizer, max_prompt_len
        self.rows = JsonlFile(path, check_conversations, strict=strict, verbose=verbose)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        messages = self.rows[i]["conversations"]
        last = max(j for j, m in enumerate(messages) if m["role"] == "assistant")
        text = self.tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][-self.max_prompt_len:]  # keep the question
        return {"prompt_ids": torch.tensor(ids), "reference": messages[last]["content"]}


def prompt_collate(rows, pad_id: int = 0) -> dict:
    """Left-pad the prompts (generation appends on the right); references stay a list of strings."""
    n = max(len(r["prompt_ids"]) for r in rows)
    input_ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, n - len(r["prompt_ids"]):] = r["prompt_ids"]
        attention_mask[i, n - len(r["prompt_ids"]):] = 1
    return {"prompt_ids": input_ids, "prompt_mask": attention_mask, "references": [r["reference"] for r in rows]}
