"""Config switches for the families users start from (issue 18, part 1): `qk_norm` computes exactly what stock
Qwen3ForCausalLM does and `attention_bias` what Qwen2ForCausalLM does, from the same tensors; the minimind3 preset has
minimind-3's ~64M parameters; checkpoints saved before these switches load unchanged; Llama / Mixtral export refuses a
model they cannot express; GGUF export picks llama.cpp's qwen3 / qwen2 architecture for them."""

import json

import pytest
import torch

from model import MicroLMConfig, MicroLMForCausalLM, to_llama_config
from model.config import _stock_kwargs


def _ours(**overrides):
    torch.manual_seed(0)
    config = MicroLMConfig.from_preset("tiny", tie_word_embeddings=False, rms_norm_eps=1e-6, **overrides)
    model = MicroLMForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a part left out would show in the logits
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight", "bias")):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    return model


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_switches_compute_what_the_stock_class_computes_from_the_same_tensors(family):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    ours = _ours(qk_norm=True) if family == "qwen3" else _ours(attention_bias=True)
    kwargs = _stock_kwargs(ours.config)
    stock = (Qwen3ForCausalLM(Qwen3Config(**kwargs, attention_bias=False)) if family == "qwen3"
             else Qwen2ForCausalLM(Qwen2Config(**kwargs))).eval()
    missing, unexpected = stock.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and not missing, (missing, unexpected)  # the same tensor names, every one used
    ids = torch.randint(3, ours.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, stock(input_ids=ids).logits, atol=1e-4)
        greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(ids, **greedy), stock.generate(ids, **greedy))
    # without the switch the tensors and the logits differ: the switch is what makes them equal
    plain = _ours()
    assert not hasattr(plain.model.layers[0].self_attn, "q_norm") and plain.model.layers[0].self_attn.q_proj.bias is None


def test_minimind3_preset_has_minimind3s_parameter_count():
    with torch.device("meta"):
        model = MicroLMForCausalLM(MicroLMConfig.from_preset("minimind3"))
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.rms_norm_eps, c.qk_norm) == (768, 8, 8, 4, 2432, 1e-6, True)
    assert round(model.param_counts()["total"] / 1e6, 2) == 63.91  # "~64M" as minimind-3 states it


def test_a_checkpoint_saved_before_the_switches_loads_with_them_off(tmp_path):
    model = MicroLMForCausalLM(MicroLMConfig.from_preset("tiny")).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("qk_norm", "attention_bias"):  # what an older config.json looks like
        config.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = MicroLMForCausalLM.from_pretrained(tmp_path).eval()
    assert not loaded.config.qk_norm and not loaded.config.attention_bias
    ids = torch.randint(3, 6400, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_llama_export_refuses_what_llama_cannot_express():
    for switch in ("qk_norm", "attention_bias"):
        with pytest.raises(ValueError, match=switch):
            to_llama_config(MicroLMConfig.from_preset("tiny", **{switch: True}))
    to_llama_config(MicroLMConfig.from_preset("tiny"))  # the default still exports


@pytest.mark.parametrize("switch, arch", [("qk_norm", "qwen3"), ("attention_bias", "qwen2")])
def test_gguf_export_writes_the_llama_cpp_architecture_that_has_the_switch(tmp_path, tokenizer, switch, arch):
    """qwen3 carries attn_q_norm / attn_k_norm, qwen2 the q/k/v biases; both rotate half-split pairs as we do (NEOX),
    so their q/k rows are written unchanged (llama's are reordered)."""
    import gguf
    from helpers import load_script

    convert = load_script("scripts/convert_model.py")
    model = _ours(**{switch: True})
    path = convert.export_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="f32")
    reader = gguf.GGUFReader(path)
    meta = {f.name: f.contents() for f in reader.fields.values()}
    tensors = {t.name: torch.from_numpy(t.data.copy()).reshape(list(reversed(t.shape.tolist()))) for t in reader.tensors}
    assert meta["general.architecture"] == arch and meta[f"{arch}.attention.key_length"] == model.config.head_dim
    sd = model.state_dict()
    assert len(tensors) == len(sd)  # every tensor has its slot (untied: output.weight too)
    expected = {"blk.0.attn_q.weight": sd["model.layers.0.self_attn.q_proj.weight"],
                "blk.0.attn_k.weight": sd["model.layers.0.self_attn.k_proj.weight"]}
    if arch == "qwen3":
        expected |= {"blk.1.attn_q_norm.weight": sd["model.layers.1.self_attn.q_norm.weight"],
                     "blk.1.attn_k_norm.weight": sd["model.layers.1.self_attn.k_norm.weight"]}
    else:
        expected |= {f"blk.1.attn_{x}.bias": sd[f"model.layers.1.self_attn.{x}_proj.bias"] for x in "qkv"}
    for name, want in expected.items():
        assert torch.equal(tensors[name], want), name

    both = MicroLMForCausalLM(MicroLMConfig.from_preset("tiny", qk_norm=True, attention_bias=True))
    with pytest.raises(ValueError, match="qk_norm \\+ attention_bias"):
        convert.export_gguf(both, tokenizer, tmp_path / "both.gguf")
    assert not (tmp_path / "both.gguf").exists() and not (tmp_path / "both.gguf.part").exists()
