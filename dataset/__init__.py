"""One Dataset class per stage format, over lazily indexed jsonl files."""

from .dpo import DPODataset, dpo_collate
from .jsonl import BadLineError, JsonlFile
from .pretrain import PretrainDataset
from .sft import SFTDataset, encode_chat, pad_collate

__all__ = ["BadLineError", "DPODataset", "JsonlFile", "PretrainDataset", "SFTDataset", "dpo_collate", "encode_chat",
           "pad_collate"]
