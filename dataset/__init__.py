"""One Dataset class per stage format, over lazily indexed jsonl files."""

from .jsonl import BadLineError, JsonlFile
from .pretrain import PretrainDataset
from .sft import SFTDataset, encode_chat, pad_collate

__all__ = ["BadLineError", "JsonlFile", "PretrainDataset", "SFTDataset", "encode_chat", "pad_collate"]
