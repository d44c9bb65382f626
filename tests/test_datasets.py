"""Stage datasets: lazy jsonl with bad-line reporting, pretraining packing, SFT loss masks."""

import json
import os

import pytest
import torch
from helpers import write_jsonl

from dataset import BadLineError, JsonlFile, PretrainDataset, SFTDataset, encode_chat, pad_collate
from dataset.chat import check_conversations
from dataset.jsonl import check_text

DOCS = ["北京是中国的首都。", "The cat sat on the mat.", "3 加 5 等于 8。", "Hello, world!\nSecond line.",
        "一个很长的句子，" * 30, "short"]


def test_packing_covers_every_token_once_with_separators_and_no_padding(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pre.jsonl", [{"text": t} for t in DOCS])
    data = PretrainDataset(path, tokenizer, max_seq_len=16, packed=True)
    rows = [data[i] for i in range(len(data))]
    for row in rows[:-1]:  # only the final block may hold padding
        assert (row["labels"] != -100).all()
        assert torch.equal(row["input_ids"], row["labels"])
    stream = torch.cat([r["input_ids"][r["labels"] != -100] for r in rows]).tolist()
    expected = []
    for text in DOCS:
        expected += [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"],
                     tokenizer.eos_token_id]
    assert stream == expected  # every token of every document, once, in order, each document closed by eos
    assert stream.count(tokenizer.eos_token_id) == len(DOCS)


def test_packing_pads_only_the_partial_last_block_and_labels_its_padding_minus_100(tmp_path, tokenizer):
    """A stream that is not a multiple of max_seq_len: the last block holds the remaining tokens, then pad ids that
    carry no label; no block is dropped and no token is repeated."""
    path = write_jsonl(tmp_path / "pre.jsonl", [{"text": t} for t in DOCS])
    n_tokens = len(PretrainDataset(path, tokenizer, max_seq_len=16).tokens)
    L = next(m for m in range(13, 40) if n_tokens % m >= 3)  # a block size that leaves a partial block
    data = PretrainDataset(path, tokenizer, max_seq_len=L, packed=True)
    assert len(data) == -(-n_tokens // L)
    last, rest = data[len(data) - 1], n_tokens % L
    assert len(last["input_ids"]) == L
    assert last["input_ids"][:rest].tolist() == data.tokens[-rest:].tolist()
    assert (last["input_ids"][rest:] == tokenizer.pad_token_id).all()
    assert (last["labels"][:rest] == last["input_ids"][:rest]).all() and (last["labels"][rest:] == -100).all()
    assert sum(int((data[i]["labels"] != -100).sum()) for i in range(len(data))) == n_tokens


def test_packing_cache_is_reused_and_invalidated_by_a_changed_file(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pre.jsonl", [{"text": t} for t in DOCS])
    first = PretrainDataset(path, tokenizer, max_seq_len=16)
    assert len(list(tmp_path.glob("pre.jsonl.*.uint16"))) == 1
    write_jsonl(path, [{"text": t} for t in DOCS[:2]])
    second = PretrainDataset(path, tokenizer, max_seq_len=16)
    assert second.cache_path != first.cache_path and len(second.tokens) < len(first.tokens)


def test_packing_cache_belongs_to_its_tokenizer(tmp_path, tokenizer):
    """The same file under another tokenizer (here one more token) is tokenized again, not read from the cache."""
    import copy

    path = write_jsonl(tmp_path / "pre.jsonl", [{"text": t} for t in DOCS])
    first = PretrainDataset(path, tokenizer, max_seq_len=16)
    other = copy.deepcopy(tokenizer)
    other.add_tokens([DOCS[0][:2]])
    second = PretrainDataset(path, other, max_seq_len=16)
    assert second.cache_path != first.cache_path and len(other) - 1 in second.tokens.tolist()


def test_padded_mode_one_document_per_row_with_padding_labelled_minus_100(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pre.jsonl", [{"text": t} for t in DOCS])
    data = PretrainDataset(path, tokenizer, max_seq_len=32, packed=False)
    assert len(data) == len(DOCS)
    row = data[0]
    ids = [tokenizer.bos_token_id, *tokenizer(DOCS[0], add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    n = len(ids)
    assert row["input_ids"][:n].tolist() == ids
    assert (row["input_ids"][n:] == tokenizer.pad_token_id).all() and (row["labels"][n:] == -100).all()
    assert row["labels"][:n].tolist() == ids
    assert len(data[4]["input_ids"]) == 32  # long document truncated


def _labelled_text(tokenizer, sample):
    return tokenizer.decode([t for t in sample["labels"].tolist() if t != -100])


def test_sft_labels_are_exactly_the_assistant_replies_and_their_im_end(tokenizer):
    conv = [{"role": "system", "content": "你是一个乐于助人的助手。"},
            {"role": "user", "content": "法国的首都是哪里？"},
            {"role": "assistant", "content": "法国的首都是巴黎。"},
            {"role": "user", "content": "What is 3 + 4?"},
            {"role": "assistant", "content": " 3 + 4 = 7.\nDone."}]
    sample = encode_chat(tokenizer, conv, max_seq_len=512)
    assert _labelled_text(tokenizer, sample) == "法国的首都是巴黎。<|im_end|> 3 + 4 = 7.\nDone.<|im_end|>"
    # positions: each labelled run starts right after "<|im_start|>assistant\n" and ends on <|im_end|>
    labels, ids = sample["labels"], sample["input_ids"]
    assert torch.equal(labels[labels != -100], ids[labels != -100])
    runs = (labels != -100).int().diff().tolist()
    assert runs.count(1) == 2 and runs.count(-1) == 2  # two separate assistant spans
    assert not any(t in (labels[labels != -100]).tolist() for t in [tokenizer.bos_token_id])


def test_sft_single_turn_and_truncation_keep_masks_right(tokenizer):
    conv = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！我是助手，很高兴见到你。"}]
    full = encode_chat(tokenizer, conv, max_seq_len=512)
    assert _labelled_text(tokenizer, full) == "你好！我是助手，很高兴见到你。<|im_end|>"
    n = len(full["input_ids"])
    cut = encode_chat(tokenizer, conv, max_seq_len=n - 3)
    assert torch.equal(cut["input_ids"], full["input_ids"][:n - 3])
    assert torch.equal(cut["labels"], full["labels"][:n - 3])
    prompt_len = len(tokenizer.apply_chat_template(conv[:1], add_generation_prompt=True, tokenize=True,
                                                return_dict=False))
    gone = encode_chat(tokenizer, conv, max_seq_len=prompt_len)
    assert (gone["labels"] == -100).all()  # reply truncated away entirely: nothing to learn from this row


def test_pad_collate_pads_to_the_longest_row_only(tokenizer):
    a = {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])}
    b = {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])}
    batch = pad_collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


BAD_SFT_LINES = [
    '{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}',
    '{"conversations": [{"role": "user", "content": "unterminated"',                        # 2: bad JSON
    '{"messages": [{"role": "user", "content": "hi"}]}',                                     # 3: missing key
    '{"conversations": []}',                                                                 # 4: empty
    '{"conversations": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}',  # 5: order
    '{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}',  # 6: empty
    '{"conversations": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}]}',
]


def test_bad_lines_are_skipped_and_reported_with_file_and_line(tmp_path, caplog):
    path = write_jsonl(tmp_path / "sft.jsonl", BAD_SFT_LINES)
    with caplog.at_level("WARNING"):
        rows = JsonlFile(path, check_conversations)
    assert len(rows) == 2
    assert [r["conversations"][0]["content"] for r in rows] == ["hi", "ok"]
    reported = [int(reason.split(":")[1]) for reason in rows.bad_lines]
    assert reported == [2, 3, 4, 5, 6]
    assert f"{path}:2:" in caplog.text and "skipped 5 bad line(s) of 7" in caplog.text


def test_strict_stops_at_the_first_bad_line(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", BAD_SFT_LINES)
    with pytest.raises(BadLineError, match=rf"{path}:2:"):
        SFTDataset(path, tokenizer=None, strict=True)


def test_file_without_usable_lines_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "pre.jsonl", ['{"txt": 1}', "not json"])
    with pytest.raises(BadLineError, match="no usable lines"):
        JsonlFile(path, check_text)
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        JsonlFile(tmp_path / "nowhere.jsonl", check_text)


def test_jsonl_reads_lazily_by_offset(tmp_path):
    rows = [{"text": f"doc {i} " + "x" * i} for i in range(50)]
    rows_path = write_jsonl(tmp_path / "pre.jsonl", rows)
    data = JsonlFile(rows_path, check_text)
    assert data.offsets.dtype.name == "int64" and len(data) == 50
    assert data[37] == rows[37] and data[0] == rows[0]
    assert json.loads(json.dumps(data[49])) == rows[49]


def test_jsonl_rows_are_right_in_forked_workers_after_a_read_in_the_parent(tmp_path):
    # DPO's --precompute_ref reads rows in the main process before the DataLoader forks its workers; with one file
    # object shared by two workers, seek + readline raced on the shared offset (truncated or foreign rows)
    rows = [{"text": f"row {i} " + "abcdefgh" * (i % 37 + 1)} for i in range(3000)]
    data = JsonlFile(write_jsonl(tmp_path / "rows.jsonl", rows), check_text)
    assert data[5] == rows[5]  # the parent opens the file
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=2,
                                         multiprocessing_context="fork", prefetch_factor=64)
    seen = [row["text"] for row in loader]
    assert seen == [r["text"] for r in rows]


def test_the_line_index_is_cached_beside_the_file_and_rebuilt_when_it_changes(tmp_path, caplog):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "a"}, "{broken", {"text": "bb"}])
    first = JsonlFile(path, check_text)
    again = JsonlFile(path, check_text)
    assert not first.from_cache and again.from_cache and (tmp_path / "p.jsonl.check_text.index.npz").exists()
    assert again.offsets.tolist() == first.offsets.tolist() and again.bad_lines == first.bad_lines
    assert [again[i] for i in range(len(again))] == [{"text": "a"}, {"text": "bb"}]
    assert sum("skipping bad line" in r.message and "p.jsonl:2" in r.message for r in caplog.records) == 2
    with pytest.raises(BadLineError, match="p.jsonl:2"):  # --strict stops on a cached bad line too
        JsonlFile(path, check_text, strict=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "ccc"}) + "\n")
    changed = JsonlFile(path, check_text)
    assert not changed.from_cache and len(changed) == 3  # size and mtime changed: parsed again
    stat = path.stat()
    path.write_bytes(path.read_bytes().replace(b'"a"', b'"z"'))  # same size, and the old mtime put back
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    rewritten = JsonlFile(path, check_text)
    assert not rewritten.from_cache and rewritten[0] == {"text": "z"}
    assert not JsonlFile(path, lambda row: None).from_cache  # a check without a stable name is never cached


@pytest.mark.e2e
def test_under_ddp_rank_0_indexes_and_the_other_rank_reads_its_index(tmp_path):
    from helpers import torchrun_2

    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "x" * i} for i in range(1, 50)] + ["{broken"])
    torchrun_2("tests/helpers/jsonl_index.py", [path, tmp_path / "seen"])
    seen = [json.loads((tmp_path / f"seen.rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["from_cache"] for s in seen] == [False, True]
    assert seen[0]["offsets"] == seen[1]["offsets"] and len(seen[1]["offsets"]) == 49 and len(seen[1]["bad"]) == 1
