"""SFTDataset: {"conversations": [...]} jsonl rendered with the tokenizer's chat template, loss on assistant tokens."""

import torch
from torch.utils.data import Dataset

from .jsonl import JsonlFile, check_conversations


def assistant_char_spans(tokenizer, messages, text: str) -> list[tuple[int, int]]:
    """Character spans of each assistant reply plus its closing eos token within the rendered `text`.

    Template-agnostic: a reply starts where the rendering of the conversation before it, with the generation
    prompt, ends. Falls back to searching the reply text for templates that rewrite earlier turns.
    """
    eos = tokenizer.eos_token
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        start = len(prefix) if text.startswith(prefix) else text.find(m["content"], cursor)
        if start < 0 or text[start:start + len(m["content"])] != m["content"]:
            raise ValueError(f"chat template does not render assistant turn {i} verbatim")
        end = text.find(eos, start + len(m["content"]))
        end = start + len(m["content"]) if end < 0 else end + len(eos)
        spans.append((start, end))
        cursor = end
    return spans


def encode_chat(tokenizer, messages, max_seq_len: int, last_reply_only: bool = False, mark=()) -> dict:
    """input_ids and labels (-100 everywhere but assistant replies and their eos), truncated to max_seq_len.
    last_reply_only: label only the final reply (the response a preference pair compares).
    mark: strings (e.g. "<think>") whose occurrences inside the labelled replies are returned as a bool "marked"
    tensor over the tokens that cover them -- by characters, so it is right however the tokenizer splits them."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = assistant_char_spans(tokenizer, messages, text)
    if last_reply_only:
        spans = spans[-1:]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels, span = [], 0
    for tok, (start, _) in zip(enc["input_ids"], enc["offset_mapping"]):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        inside = span < len(spans) and spans[span][0] <= start < spans[span][1]
        labels.append(tok if inside else -100)
    out = {"input_ids": torch.tensor(enc["input_ids"][:max_seq_len]), "labels": torch.tensor(labels[:max_seq_len])}
    if mark:
        found = [(i, i + len(m)) for s, e in spans for m in mark for i in _find_all(text, m, s, e)]
        marked = [label != -100 and any(a < fe and b > fs for fs, fe in found)
                  for label, (a, b) in zip(labels, enc["offset_mapping"])]
        out["marked"] = torch.tensor(marked[:max_seq_len], dtype=torch.bool)
    return out


def _find_all(text: str, sub: str, start: int, end: int):
    i = text.find(sub, start, end)
    while i >= 0:
        yield i
        i = text.find(sub, i + len(sub), end)


class SFTDataset(Dataset):
    def __init__(self, path, tokenizer, max_seq_len: int = 512, strict: bool = False, verbose: bool = True):
        self.tokenizer, self.max_seq_len = tokenizer, max_seq_len
        self.rows = JsonlFile(path, check_conversations, strict=strict, verbose=verbose)

    @property
    def lengths(self):
        """Line sizes in bytes, for length-grouped batches (the engine's --group_by_length)."""
        return self.rows.sizes

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return encode_chat(self.tokenizer, self.rows[i]["conversations"], self.max_seq_len)


def pad_collate(rows, pad_id: int = 0) -> dict:
    """Right-pad a list of {input_ids, labels[, weights]} to the longest row of the batch (not to max_seq_len)."""
    n = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, :len(r["input_ids"])] = r["input_ids"]
        labels[i, :len(r["labels"])] = r["labels"]
    batch = {"input_ids": input_ids, "labels": labels}
    if "weights" in rows[0]:
        batch["weights"] = torch.zeros((len(rows), n))
        for i, r in enumerate(rows):
            batch["weights"][i, :len(r["weights"])] = r["weights"]
    return batch
