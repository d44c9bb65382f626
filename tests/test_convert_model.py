"""scripts/convert_model.py: a dense export loads as stock LlamaForCausalLM (no remote code) with our logits and
generation; a LoRA stage exports merged; a MoE export loads through auto_map with trust_remote_code."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import load_script, make_model, random_ids, save_random_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from model.lora import from_adapter

convert = load_script("scripts/convert_model.py")


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _assert_stock_export(out, ours, model_class, model_type, atol):
    """The folder loads as the stock class (no remote code) with our logits and our greedy output."""
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == model_type and "auto_map" not in cfg
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(stock) is model_class
    x = random_ids(2, 16)
    with torch.no_grad():
        assert (stock(x).logits - ours(x).logits).abs().max() <= atol
    prompt = torch.tensor([[1, 300, 400, 500]])
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(stock.generate(prompt, **greedy), ours.generate(prompt, **greedy))
    return stock


def test_dense_export_is_stock_llama_with_our_logits_and_chat_template(tmp_path, tokenizer):
    ours = make_model("tiny", seed=2)
    _save(ours, tokenizer, tmp_path / "out" / "sft")
    out = convert.main(["--out_dir", str(tmp_path / "out"), "--stage", "sft", "--out", str(tmp_path / "hf")])
    llama = _assert_stock_export(out, ours, LlamaForCausalLM, "llama", atol=1e-4)
    exported_tok = AutoTokenizer.from_pretrained(out)
    assert exported_tok.chat_template == tokenizer.chat_template
    assert llama.generation_config.eos_token_id == tokenizer.eos_token_id


def test_lora_stage_exports_base_plus_adapter_merged(tmp_path, tokenizer):
    base = _save(make_model("tiny", seed=2), tokenizer, tmp_path / "out" / "sft")
    save_random_adapter(tmp_path / "out" / "lora", base, seed=2)
    out = convert.main(["--out_dir", str(tmp_path / "out"), "--stage", "lora", "--out", str(tmp_path / "hf")])
    llama = LlamaForCausalLM.from_pretrained(out).eval()
    x = random_ids(1, 12)
    with torch.no_grad():
        want = from_adapter(tmp_path / "out" / "lora").eval()(x).logits
        assert (llama(x).logits - want).abs().max() <= 1e-4
        assert (llama(x).logits - make_model("tiny", seed=2)(x).logits).abs().max() > 1e-3  # the adapter is in


@pytest.mark.e2e
def test_moe_export_loads_through_auto_map_with_remote_code(tmp_path, tokenizer):
    ours = make_model("tiny-moe", seed=2)
    _save(ours, tokenizer, tmp_path / "moe")
    out = convert.main(["--model_path", str(tmp_path / "moe"), "--out", str(tmp_path / "hf")])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_microlm.MicroLMForCausalLM"
    assert "from .config import" not in (out / "modeling_microlm.py").read_text()
    # in a fresh process, outside this repository: only the exported code can build the model
    x = random_ids(2, 10)
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys, torch\n"
              "from transformers import AutoModelForCausalLM\n"
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
              "assert type(m).__module__.endswith('modeling_microlm'), type(m).__module__\n"
              "with torch.no_grad():\n"
              "    torch.save(m(torch.load(sys.argv[2], weights_only=True)).logits, sys.argv[3])\n")
    subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"})
    with torch.no_grad():
        assert (torch.load(tmp_path / "y.pt", weights_only=True) - ours(x).logits).abs().max() <= 1e-5


def _gguf(path):
    import gguf

    reader = gguf.GGUFReader(path)
    return reader, {f.name: f.contents() for f in reader.fields.values()}, {t.name: t for t in reader.tensors}


def test_gguf_export_holds_weights_hyperparameters_and_tokenizer(tmp_path, tokenizer):
    import gguf
    import numpy as np

    ours = make_model("tiny", seed=4, tie_word_embeddings=False)
    _save(ours, tokenizer, tmp_path / "out" / "sft")
    path = convert.main(["--out_dir", str(tmp_path / "out"), "--stage", "sft", "--gguf", str(tmp_path / "m.gguf")])
    _, meta, tensors = _gguf(path)
    c = ours.config
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert (meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.feed_forward_length"],
            meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"],
            meta["llama.context_length"]) == (c.num_hidden_layers, c.hidden_size, c.intermediate_size,
                                              c.num_attention_heads, c.num_key_value_heads,
                                              c.max_position_embeddings)
    assert meta["llama.rope.freq_base"] == c.rope_theta
    assert meta["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(c.vocab_size)))
    types = meta["tokenizer.ggml.token_type"]
    assert types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL
    assert types[tokenizer.convert_tokens_to_ids("<think>")] == gguf.TokenType.USER_DEFINED
    assert types[500] == gguf.TokenType.NORMAL
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    assert meta["tokenizer.ggml.pre"] == "qwen2"
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]

    sd = ours.state_dict()
    assert len(tensors) == len(sd)  # every tensor, output.weight included (untied)
    expected = {"token_embd.weight": sd["model.embed_tokens.weight"], "output.weight": sd["lm_head.weight"],
                "output_norm.weight": sd["model.norm.weight"],
                "blk.1.attn_q.weight": convert.interleave_rope_rows(sd["model.layers.1.self_attn.q_proj.weight"], 4),
                "blk.1.attn_k.weight": convert.interleave_rope_rows(sd["model.layers.1.self_attn.k_proj.weight"], 2),
                "blk.1.attn_v.weight": sd["model.layers.1.self_attn.v_proj.weight"],
                "blk.1.ffn_down.weight": sd["model.layers.1.mlp.down_proj.weight"],
                "blk.1.ffn_norm.weight": sd["model.layers.1.post_attention_layernorm.weight"]}
    for name, want in expected.items():
        got = tensors[name]
        assert got.data.shape == tuple(want.shape), name
        assert got.tensor_type == (gguf.GGMLQuantizationType.F16 if want.ndim > 1 else gguf.GGMLQuantizationType.F32)
        np.testing.assert_allclose(np.asarray(got.data, dtype=np.float32), want.numpy(), atol=1e-3, rtol=1e-3)

    tied = make_model("tiny", seed=4)
    _, _, tied_tensors = _gguf(convert.export_gguf(tied, tokenizer, tmp_path / "tied.gguf"))
    assert "output.weight" not in tied_tensors and len(tied_tensors) == len(tensors) - 1


def test_gguf_pre_tokenizer_name_is_the_split_the_tokenizer_uses(tokenizer):
    from tokenizers import Regex, pre_tokenizers

    assert convert.gguf_pre(tokenizer) == "qwen2"  # the shipped tokenizer splits as Qwen2's does
    gpt2 = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer.__class__.from_str(
        tokenizer.backend_tokenizer.to_str()))
    gpt2.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert convert.gguf_pre(gpt2) == "gpt-2"
    gpt2.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}| ?\p{L}+|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    with pytest.raises(ValueError, match="no pre-tokenizer known to match"):
        convert.gguf_pre(gpt2)  # llama.cpp would split differently: refused, not exported wrong


def test_gguf_q_k_rows_give_our_attention_under_llama_cpp_rotary_layout(tmp_path, tokenizer):
    """llama.cpp's llama architecture rotates adjacent pairs (2i, 2i+1); we rotate (i, i + d/2). With the exported
    q/k rows, adjacent-pair rotary attention scores must equal ours."""
    from model.model import apply_rotary, rope_inv_freq

    ours = make_model("tiny", seed=5)
    c = ours.config
    _, _, tensors = _gguf(convert.export_gguf(ours, tokenizer, tmp_path / "m.gguf", dtype="f32"))
    torch.manual_seed(0)
    T, d, nh, nkv = 9, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    x = torch.randn(T, c.hidden_size)
    inv_freq, _ = rope_inv_freq(c)
    angles = torch.arange(T).float()[:, None] * inv_freq  # (T, d/2)

    def heads(w, n):
        return (x @ w.T).view(T, n, d).transpose(0, 1)  # (n, T, d)

    attn = ours.model.layers[0].self_attn
    emb = torch.cat([angles, angles], dim=-1)[None]
    q, k = apply_rotary(heads(attn.q_proj.weight, nh)[None], heads(attn.k_proj.weight, nkv)[None], emb.cos(),
                        emb.sin())
    scores = q[0] @ k[0].repeat_interleave(nh // nkv, dim=0).transpose(1, 2)

    def rotate_pairs(h):  # adjacent pairs as complex numbers times e^{i·angle}
        z = torch.view_as_complex(h.reshape(*h.shape[:-1], d // 2, 2).contiguous())
        return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)).flatten(-2)

    qg = rotate_pairs(heads(torch.from_numpy(tensors["blk.0.attn_q.weight"].data.copy()), nh))
    kg = rotate_pairs(heads(torch.from_numpy(tensors["blk.0.attn_k.weight"].data.copy()), nkv))
    scores_gguf = qg @ kg.repeat_interleave(nh // nkv, dim=0).transpose(1, 2)
    assert (scores_gguf - scores).abs().max() <= 1e-4
    # and the reordering is needed: the unreordered rows give other scores
    q_plain = rotate_pairs(heads(attn.q_proj.weight, nh))
    k_plain = rotate_pairs(heads(attn.k_proj.weight, nkv))
    assert (q_plain @ k_plain.repeat_interleave(nh // nkv, dim=0).transpose(1, 2) - scores).abs().max() > 1e-2


def test_gguf_export_of_a_moe_model_stops_with_a_clear_error(tmp_path, tokenizer):
    _save(make_model("tiny-moe"), tokenizer, tmp_path / "out" / "sft")
    try:
        convert.main(["--out_dir", str(tmp_path / "out"), "--stage", "sft", "--gguf", str(tmp_path / "m.gguf")])
    except SystemExit as e:
        assert "dense" in str(e) and "--out" in str(e)
    else:
        raise AssertionError("a MoE GGUF export must stop")
    assert not (tmp_path / "m.gguf").exists()


def test_moe_without_shared_experts_exports_as_stock_mixtral(tmp_path, tokenizer):
    from transformers import MixtralForCausalLM

    ours = make_model("tiny-moe", seed=6, n_shared_experts=0)
    _save(ours, tokenizer, tmp_path / "moe")
    out = convert.main(["--model_path", str(tmp_path / "moe"), "--out", str(tmp_path / "hf")])
    _assert_stock_export(out, ours, MixtralForCausalLM, "mixtral", atol=1e-5)


@pytest.mark.parametrize("dtype, max_error", [("q8_0", 0.6 / 127), ("q4_0", 1.1 / 8)])
def test_quantized_gguf_holds_every_matrix_within_its_block_scale(tmp_path, tokenizer, dtype, max_error):
    """--gguf_dtype q8_0 / q4_0: matrices in llama.cpp's 32-weight blocks, read back and dequantized within the
    rounding of the f32 weights (q8_0: half of the block's largest |weight| / 127; q4_0: one step, its / 8, as the
    4-bit range is asymmetric; plus the f16 rounding of each block's scale); norms stay f32; the file is smaller than
    the f16 one."""
    import gguf
    import numpy as np

    ours = make_model("tiny", seed=4, tie_word_embeddings=False)
    _save(ours, tokenizer, tmp_path / "out" / "sft")
    path = convert.main(["--out_dir", str(tmp_path / "out"), "--stage", "sft", "--gguf", str(tmp_path / "q.gguf"),
                         "--gguf_dtype", dtype])
    _, meta, tensors = _gguf(path)
    qtype = getattr(gguf.GGMLQuantizationType, dtype.upper())
    assert meta["general.file_type"] == getattr(gguf.LlamaFileType, f"MOSTLY_{dtype.upper()}")
    sd = ours.state_dict()
    want = {"blk.0.attn_v.weight": sd["model.layers.0.self_attn.v_proj.weight"],
            "blk.1.ffn_down.weight": sd["model.layers.1.mlp.down_proj.weight"],
            "output.weight": sd["lm_head.weight"],
            "blk.0.attn_norm.weight": sd["model.layers.0.input_layernorm.weight"]}
    for name, w in want.items():
        t, w = tensors[name], w.numpy()
        if w.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(np.asarray(t.data), w)
            continue
        assert t.tensor_type == qtype
        got = gguf.quants.dequantize(np.asarray(t.data), qtype).reshape(w.shape)
        bound = np.abs(w.reshape(-1, 32)).max(1, keepdims=True) * max_error  # per block
        assert (np.abs(got - w).reshape(-1, 32) <= bound + 1e-6).all(), name
    f16 = convert.export_gguf(ours, tokenizer, tmp_path / "f16.gguf")
    assert path.stat().st_size < f16.stat().st_size
