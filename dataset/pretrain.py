"""PretrainDataset: {"text": ...} jsonl for stage 1, packed (default) or one padded document per row."""

import hashlib
import logging
import math
import os

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from tqdm import tqdm

from .jsonl import JsonlFile, check_text

log = logging.getLogger(__name__)


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha1(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:12]


LEGACY_MARKERS = ("<s>", "</s>")  # the seed's document separators


def document_ids(tokenizer, texts) -> list[list[int]]:
    """Each document as bos + text + eos: the separators tell the model where one document ends.

    Texts that already carry separators are not wrapped twice: MiniMind's pretrain_hq.jsonl writes
    `<|im_start|>...<|im_end|>` inside the text (parsed as the special tokens they are), the seed's files `<s>...</s>`
    (mapped to bos/eos when the tokenizer has no such tokens, instead of becoming the pieces `<`, `s`, `>`)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    vocab = tokenizer.get_vocab()
    legacy = [m for m in LEGACY_MARKERS if m not in vocab]
    if legacy:
        swap = {"<s>": tokenizer.bos_token, "</s>": tokenizer.eos_token}
        texts = [t if "<s>" not in t and "</s>" not in t else _replace_all(t, {m: swap[m] for m in legacy})
                 for t in texts]
    out = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids = ids if ids[:1] == [bos] else [bos, *ids]
        out.append(ids if ids[-1:] == [eos] else [*ids, eos])
    return out


def _replace_all(text, mapping):
    for old, new in mapping.items():
        text = text.replace(old, new)
    return text


def build_token_stream(docs: JsonlFile, tokenizer, out_path: str, chunk: int = 2048) -> None:
    """Tokenize every document once into one flat array on disk (uint16 for vocabularies below 65536)."""
    dtype = np.uint16 if len(tokenizer) < 2 ** 16 else np.uint32
    tmp = f"{out_path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        for start in tqdm(range(0, len(docs), chunk), desc=f"tokenizing {os.path.basename(docs.path)}",
                          unit_scale=chunk, disable=None):
            texts = [docs[i]["text"] for i in range(start, min(start + chunk, len(docs)))]
            for ids in document_ids(tokenizer, texts):
                f.write(np.asarray(ids, dtype=dtype).tobytes())
    os.replace(tmp, out_path)  # a half-written cache never looks complete


class PretrainDataset(Dataset):
    """Rows of `max_seq_len` tokens with `labels` (the model shifts them by one).

    packed=True: all documents (bos + text + eos) concatenated and cut into full blocks -- no compute spent on
    padding; each token is seen once per epoch, only the last block is padded. The token stream is built once and
    cached beside the data file (`<file>.<tokenizer hash>.u16`), then memory-mapped.
    packed=False: one document per row, truncated and padded to max_seq_len (MiniMind's way).
    Padding is labelled -100.
    doc_mask=True (packed rows): rows also carry `position_ids` that restart after each eos, so each document attends
    only to itself and starts at position 0, as it would alone (model.document_mask).
    """

    def __init__(self, path, tokenizer, max_seq_len: int = 512, packed: bool = True, strict: bool = False,
                 cache_dir=None, doc_mask: bool = False):
        self.tokenizer, self.max_seq_len, self.packed = tokenizer, max_seq_len, packed
        self.doc_mask = doc_mask and packed
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        distributed = dist.is_available() and dist.is_initialized()
        main = not distributed or dist.get_rank() == 0
        self.docs = JsonlFile(path, check_text, strict=strict, verbose=main)
        if not packed:
            return
        stat = os.stat(path)
        key = hashlib.sha1(f"{stat.st_size}:{stat.st_mtime_ns}:{tokenizer_fingerprint(tokenizer)}:v2".encode())
        dtype = np.uint16 if len(tokenizer) < 2 ** 16 else np.uint32
        self.cache_path = os.path.join(cache_dir or os.path.dirname(os.path.abspath(path)),
                                       f"{os.path.basename(path)}.{key.hexdigest()[:12]}.{np.dtype(dtype).name}")
        if main and not os.path.exists(self.cache_path):
            build_token_stream(self.docs, tokenizer, self.cache_path)
        if distributed:
            dist.barrier()  # the other ranks wait for rank 0's cache
        self.tokens = np.memmap(self.cache_path, dtype=dtype, mode="r")
        self.n_blocks = math.ceil(len(self.tokens) / max_seq_len)

    @property
    def lengths(self):
        """Document sizes in bytes when padded (for --group_by_length); packed rows are all full."""
        return None if self.packed else self.docs.sizes

    def __len__(self):
        return self.n_blocks if self.packed else len(self.docs)

    def __getitem__(self, i):
        L = self.max_seq_len
        if self.packed:
            ids = torch.from_numpy(self.tokens[i * L:(i + 1) * L].astype(np.int64))
        else:
            ids = torch.tensor(document_ids(self.tokenizer, [self.docs[i]["text"]])[0][:L])
        n = len(ids)
        input_ids = torch.full((L,), self.pad_id, dtype=torch.long)
        input_ids[:n] = ids
        labels = torch.full((L,), -100, dtype=torch.long)
        labels[:n] = ids
        real = torch.tensor(n)  # the row's tokens without its padding (the engine's token counts)
        if not self.doc_mask:
            return {"input_ids": input_ids, "labels": labels, "real_tokens": real}
        # a document starts at the row's first token and after every eos (the padding tail: after the last one)
        starts = torch.ones(L, dtype=torch.bool)
        starts[1:] = input_ids[:-1] == self.tokenizer.eos_token_id
        idx = torch.arange(L)
        position_ids = idx - torch.cummax(torch.where(starts, idx, 0), 0).values
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "real_tokens": real}
