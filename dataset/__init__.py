"""One Dataset class per stage format, over lazily indexed jsonl files."""

from .chat import ChatEncoder, normalize_chat
from .dpo import DPODataset, dpo_collate
from .jsonl import BadLineError, JsonlFile, read_jsonl, write_jsonl
from .pretrain import PretrainDataset
from .reason import REASON_TAGS, PromptDataset, ReasonDataset, prompt_collate
from .sft import SFTDataset, encode_chat, pack_collate, pad_collate, pad_id_of

__all__ = ["BadLineError", "ChatEncoder", "normalize_chat", "DPODataset", "JsonlFile", "PretrainDataset", "PromptDataset", "REASON_TAGS",
           "ReasonDataset", "SFTDataset", "dpo_collate", "encode_chat", "pack_collate", "pad_collate", "pad_id_of", "prompt_collate",
           "read_jsonl", "write_jsonl"]
