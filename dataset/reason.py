"""Stage 6 data: reasoning SFT rows with extra loss weight on the think/answer tags, and GRPO prompts."""

import torch
from torch.utils.data import Dataset

from .chat import ChatEncoder, check_prompt_row, lost_fields, normalize_chat, row_chooses
from .jsonl import BadLineError, JsonlFile, warn_row
from .sft import EMPTY_THINK_RATIO, SFTDataset, report_lost, unmappable

REASON_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


class ReasonDataset(SFTDataset):
    """SFTDataset plus "weights": 0 off the labels, `tag_weight` on the tokens that spell a tag inside a reply, 1 on
    every other reply token. Tags are found as whole strings in the reply text and mapped to the tokens covering
    them, so a tag split into BPE pieces is weighted as a whole and a stray "<" elsewhere is not."""

    def __init__(self, path, tokenizer, max_seq_len: int = 1024, tag_weight: float = 10.0, tags=REASON_TAGS,
                 strict: bool = False, verbose: bool = True, empty_think_ratio: float = EMPTY_THINK_RATIO,
                 seed: int = 0):
        super().__init__(path, tokenizer, max_seq_len, strict=strict, verbose=verbose,
                         empty_think_ratio=empty_think_ratio, seed=seed)
        self.tag_weight, self.tags = float(tag_weight), tuple(tags)

    def __getitem__(self, i):
        try:
            messages, tools = self.messages(i)
            item = self.encoder.encode(messages, tools, self.max_seq_len, mark=self.tags)
        except BadLineError as e:
            return unmappable(self.rows, i, e)
        report_lost(self.rows, i, item.get("lost"))
        marked = item.pop("marked")
        item["weights"] = torch.where(item["labels"] == -100, 0.0, torch.where(marked, self.tag_weight, 1.0))
        return item


class PromptDataset(Dataset):
    """RL prompts from {"conversations": [...]} rows, three kinds:
    - the seed's: the last assistant reply is the reference (a reward may read its <answer>); the prompt is every
      message before it;
    - rlaif.jsonl's: the last assistant turn is empty (or the chat ends with the user): a prompt, no reference;
    - agent_rl*.jsonl's: tools in the system message and "gt", the accepted final answers (and, optionally,
      "tool_results": {tool name: its result in this chat}, a scripted environment for agentic RL).
    Each item: prompt_ids (rendered with the tools and the generation prompt), reference (str or None), gt (list
    or None), and the messages and tools for multi-turn rollouts."""

    def __init__(self, path, tokenizer, max_prompt_len: int = 256, strict: bool = False, verbose: bool = True,
                 thinking_ratio: float | None = None, seed: int = 0):
        self.tokenizer, self.max_prompt_len = tokenizer, max_prompt_len
        # MiniMind's thinking ratio: this share of prompts (a fixed, seeded choice per row) is rendered with thinking
        # on, the rest with it off; None leaves the template's default
        self.thinking_ratio, self.seed = thinking_ratio, seed
        self.rows = JsonlFile(path, check_prompt_row, strict=strict, verbose=verbose)
        self.encoder = ChatEncoder(tokenizer)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        messages, tools = normalize_chat(row["conversations"], complete=False)
        reference = None
        if messages[-1]["role"] == "assistant":
            last = messages.pop()
            reference = last["content"] if last["content"].strip() else None
        gt = row.get("gt")
        gt = None if gt is None else [str(g) for g in (gt if isinstance(gt, list) else [gt])]
        thinking = {}
        if self.thinking_ratio is not None:
            on = row_chooses(self.seed, i, self.thinking_ratio)
            thinking = {"enable_thinking": on, "open_thinking": on}  # ours reads the first, minimind-3's the second
        text = self.encoder.render(messages, tools, add_generation_prompt=True, **thinking)
        report_lost(self.rows, i, lost_fields(messages, text))
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_prompt_len:  # keep the end: the question and the generation prompt
            warn_row("long prompts", self.rows.where(i), f"prompt of {len(ids)} tokens cut to its last "
                     f"{self.max_prompt_len} (--max_prompt_len)")
            ids = ids[-self.max_prompt_len:]
        # a prompt that opens the think block (thinking on): the reply starts inside it, and is scored with it
        return {"prompt_ids": torch.tensor(ids), "reference": reference, "gt": gt, "messages": messages,
                "tools": tools, "opened": text.endswith("<think>\n"), "tool_results": row.get("tool_results")}


def prompt_collate(rows, pad_id: int = 0) -> dict:
    """Left-pad the prompts (generation appends on the right); references stay a list of strings."""
    n = max(len(r["prompt_ids"]) for r in rows)
    input_ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, n - len(r["prompt_ids"]):] = r["prompt_ids"]
        attention_mask[i, n - len(r["prompt_ids"]):] = 1
    return {"prompt_ids": input_ids, "prompt_mask": attention_mask, "references": [r["reference"] for r in rows],
            "gt": [r["gt"] for r in rows], "messages": [r["messages"] for r in rows], "tools": [r["tools"] for r in rows],
            "opened": [r.get("opened", False) for r in rows], "tool_results": [r.get("tool_results") for r in rows]}
