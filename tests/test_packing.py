"""Packed rows (SFT --pack, pretraining --doc_mask): each document attends only to itself, so its loss and gradient
are what they would be alone; a stock transformers model reads the same rows the same way (white-box KD)."""

import pytest
import torch
from helpers import make_model, tiny_args, write_jsonl

from dataset import PretrainDataset, SFTDataset, pack_collate, pad_collate
from dataset.pretrain import document_ids
from dataset.sft import pack_rows
from model.model import document_mask


def _chats(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        turns = [{"role": "user", "content": f"第{i}个问题：" + "为什么" * int(torch.randint(1, 12, (), generator=g))},
                 {"role": "assistant", "content": "因为" * int(torch.randint(1, 20, (), generator=g)) + "。"}]
        rows.append({"conversations": turns})
    return rows


def _per_row_ce(model, batch):
    return model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), labels=batch["labels"],
                 reduction="none").loss  # (B, T-1), 0 where unlabelled


def test_pack_rows_keeps_every_item_once_and_within_capacity():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 120, (200,), generator=g).tolist() + [300]  # one longer than the capacity
    bins = pack_rows(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins if len(b) > 1)
    assert len(bins) <= sum(lengths) / 128 * 1.1 + 1  # first-fit decreasing leaves little room


def test_document_mask_keeps_documents_apart_and_causal():
    pos = torch.tensor([[0, 1, 2, 0, 1, 7, 8, 0]])  # three documents, then one that began in an earlier row
    mask = document_mask(pos)[0, 0]
    doc = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])
    expected = (doc[:, None] == doc[None, :]) & torch.ones(8, 8, dtype=torch.bool).tril()
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_packed_conversations_have_the_loss_and_gradient_they_have_alone(tmp_path, tokenizer, preset):
    ds = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", _chats()), tokenizer, max_seq_len=96)
    rows = [ds[i] for i in range(len(ds))]
    g = torch.Generator().manual_seed(0)
    for r in rows:  # 6-reason.py's per-token weights travel with their tokens
        r["weights"] = (r["labels"] != -100) * torch.rand(len(r["labels"]), generator=g)
    model = make_model(preset).train()  # dropout is 0: train mode only switches the MoE/gradient paths
    packed = pack_collate(rows, pad_id=0, max_seq_len=96)
    assert packed["input_ids"].shape[0] < len(rows) // 2  # really packed
    ce = _per_row_ce(model, packed)
    # where each conversation landed: pack_rows' bins, in order, each conversation after the previous one
    alone_sum, weighted = 0.0, 0.0
    for b, members in enumerate(pack_rows([len(r["input_ids"]) for r in rows], 96)):
        offset = 0
        for i in members:
            n = len(rows[i]["input_ids"])
            alone = _per_row_ce(model, pad_collate([rows[i]]))[0]
            got = ce[b, offset:offset + n - 1]
            torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
            w = packed["weights"][b, offset + 1:offset + n]
            torch.testing.assert_close(w, rows[i]["weights"][1:])
            alone_sum = alone_sum + alone.sum()
            weighted = weighted + (alone * rows[i]["weights"][1:]).sum()
            offset += n
    # gradients too: the packed batch's summed loss against the conversations' losses summed one by one
    grads = torch.autograd.grad(ce.sum(), list(model.parameters()), allow_unused=True)
    alone_grads = torch.autograd.grad(alone_sum, list(model.parameters()), allow_unused=True)
    for a, b in zip(grads, alone_grads):
        if a is not None:  # fp32 sums in another order (other rows per matmul): noise ~1e-5 of the largest entry
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    torch.testing.assert_close((ce * packed["weights"][:, 1:]).sum(), weighted.detach(), rtol=1e-5, atol=1e-5)


def test_pretrain_doc_mask_restarts_positions_after_eos_and_scores_each_document_alone(tmp_path, tokenizer):
    texts = ["小明每天学习。" * k for k in (1, 3, 2, 5, 1, 4)] + ["The cat likes to sleep. " * 6]
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts])
    masked = PretrainDataset(path, tokenizer, max_seq_len=64, doc_mask=True)
    plain = PretrainDataset(path, tokenizer, max_seq_len=64)
    docs = document_ids(tokenizer, texts)
    row = masked[0]
    ids, pos = row["input_ids"], row["position_ids"]
    assert torch.equal(ids, plain[0]["input_ids"]) and "position_ids" not in plain[0]
    first, second = len(docs[0]), len(docs[1])
    assert pos[:first].tolist() == list(range(first)) and pos[first:first + second].tolist() == list(range(second))
    model = make_model("tiny")
    with torch.no_grad():
        ce = _per_row_ce(model, {k: v[None] for k, v in row.items()})[0]
        alone = _per_row_ce(model, {"input_ids": torch.tensor([docs[1]]), "labels": torch.tensor([docs[1]])})[0]
        stream = _per_row_ce(model, {k: v[None] for k, v in plain[0].items()})[0]
    torch.testing.assert_close(ce[first:first + second - 1], alone, rtol=1e-5, atol=1e-5)
    assert (stream[first:first + second - 1] - alone).abs().max() > 1e-3  # without the mask it sees the first doc


def test_a_transformers_teacher_reads_packed_rows_as_separate_documents(tmp_path, tokenizer):
    """White-box KD passes the packed rows' position_ids to the teacher; a stock Llama must not mix documents."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           attn_implementation="sdpa")).eval()
    ds = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", _chats(4)), tokenizer, max_seq_len=200)
    rows = [ds[i] for i in range(4)]
    packed = pack_collate(rows, pad_id=0, max_seq_len=200)
    assert packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        logits = teacher(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        offset = 0
        for i in pack_rows([len(r["input_ids"]) for r in rows], 200)[0]:
            n = len(rows[i]["input_ids"])
            alone = teacher(input_ids=rows[i]["input_ids"][None], use_cache=False).logits[0]
            torch.testing.assert_close(logits[0, offset:offset + n], alone, rtol=1e-4, atol=1e-4)
            offset += n


def test_sft_packed_by_default_trains_like_padded_rows(tmp_path, tokenizer):
    """The same rows per step, the same loss: --pack (default) and --no_pack end at the same weights."""
    from helpers import load_script, max_weight_diff

    sft = load_script("2-sft.py")
    data = write_jsonl(tmp_path / "sft.jsonl", _chats(24, seed=3))
    common = ("--max_seq_len", 96, "--max_steps", 3, "--batch_size", 8, "--learning_rate", 1e-3, "--grad_clip", 0,
              "--from", "none")
    packed = sft.main(tiny_args(tmp_path / "pack", data, *common))
    padded = sft.main(tiny_args(tmp_path / "pad", data, *common, "--no_pack"))
    assert [round(v, 4) for _, v in packed["history"]] == [round(v, 4) for _, v in padded["history"]]
    assert max_weight_diff(tmp_path / "pack/out/sft", tmp_path / "pad/out/sft") <= 1e-5


def test_a_conversations_first_label_never_becomes_the_previous_ones_target():
    """pad_collate never uses a row's first label (nothing predicts it); packed, it must not follow the conversation
    before it either -- with rows labelled everywhere the packed loss is still the sum of the lone ones."""
    g = torch.Generator().manual_seed(2)
    rows = [{"input_ids": ids, "labels": ids.clone()}
            for ids in (torch.randint(3, 6400, (int(n),), generator=g) for n in torch.randint(4, 30, (9,), generator=g))]
    model = make_model("tiny")
    with torch.no_grad():
        packed = _per_row_ce(model, pack_collate(rows, pad_id=0, max_seq_len=64)).sum()
        alone = sum(_per_row_ce(model, pad_collate([r])).sum() for r in rows)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-4)
