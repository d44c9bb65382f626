"""Hugging Face round trips: save_pretrained/from_pretrained, Auto classes, stock Llama, strict loading."""

import json

import pytest
import torch
from helpers import make_model, random_ids
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from model import MicroLMForCausalLM, to_llama_config, yarn_rope_parameters


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_save_then_auto_from_pretrained_gives_identical_logits(tmp_path, preset):
    model = make_model(preset)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "microlm"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), type(model.config))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MicroLMForCausalLM)
    # RoPE tables are not in the checkpoint: they must be recomputed, not left uninitialised
    torch.testing.assert_close(loaded.model.rotary_emb.cos, model.model.rotary_emb.cos, rtol=0, atol=0)
    x = random_ids(2, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_from_pretrained_bf16_keeps_rope_tables_in_fp32(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    loaded = MicroLMForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    x = random_ids(1, 8)
    with torch.no_grad():
        assert (loaded(x).logits.float() - tiny_model(x).logits).abs().max() < 0.1


@pytest.mark.parametrize("rope", [None, yarn_rope_parameters(factor=4.0, original_max_position_embeddings=16)])
def test_dense_checkpoint_loads_into_stock_llama_with_same_logits(tmp_path, rope):
    model = make_model("tiny", **({"rope_parameters": rope} if rope else {}))
    model.save_pretrained(tmp_path)
    llama, info = LlamaForCausalLM.from_pretrained(tmp_path, config=to_llama_config(model.config),
                                                   output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = random_ids(2, 40)
    with torch.no_grad():
        assert (llama.eval()(x).logits - model(x).logits).abs().max().item() <= 1e-4


def test_moe_has_no_llama_config():
    with pytest.raises(ValueError, match="MoE"):
        to_llama_config(make_model("tiny-moe").config)


def test_checkpoint_with_missing_tensor_is_an_error_naming_it(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.9.extra.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*model\.layers\.9\.extra\.weight"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_checkpoint_of_another_shape_is_an_error(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 256
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises((ValueError, RuntimeError), match="up_proj"):
        MicroLMForCausalLM.from_pretrained(tmp_path)


def test_state_dict_names_follow_hf_llama(tiny_model):
    names = set(tiny_model.state_dict())
    for expected in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                     "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
                     "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                     "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight",
                     "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
                     "model.layers.0.mlp.down_proj.weight"]:
        assert expected in names
