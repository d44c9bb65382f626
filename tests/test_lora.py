"""LoRA: zero-effect init, freezing, merge/unmerge, adapter-only files in PEFT's format, interop with peft."""

import json

import peft
import pytest
import torch
from helpers import make_model, random_ids
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from model import MicroLMForCausalLM, to_llama_config
from model.lora import (DEFAULT_TARGETS, LoRALinear, apply_lora, count_trainable, load_adapter,
                        mark_only_lora_trainable, merge_lora, remove_lora, save_adapter, unmerge_lora)


def _randomise_adapter(model, seed=0):
    """A fresh adapter has B = 0; give it values so that its effect is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


def test_fresh_adapter_leaves_outputs_unchanged(tiny_model):
    x = random_ids(2, 12)
    with torch.no_grad():
        before = tiny_model(x).logits
        wrapped = apply_lora(tiny_model, r=4, alpha=8)
        after = tiny_model(x).logits
    assert len(wrapped) == len(DEFAULT_TARGETS) * tiny_model.config.num_hidden_layers
    assert torch.equal(before, after)


def test_lora_dropout_acts_on_the_adapter_path_in_training_only():
    x = random_ids(2, 12)
    for p, varies in ((0.5, True), (0.0, False)):  # the base model itself has no dropout
        model = make_model("tiny")
        apply_lora(model, r=4, alpha=8, dropout=p)
        _randomise_adapter(model)
        with torch.no_grad():
            model.train()
            a, b = model(x).logits, model(x).logits
            model.eval()
            c, d = model(x).logits, model(x).logits
        assert (not torch.equal(a, b)) == varies and torch.equal(c, d)


def test_target_modules_select_by_name_and_unknown_targets_fail(tiny_model):
    wrapped = apply_lora(tiny_model, r=2, target_modules=["q_proj", "v_proj"])
    assert sorted({n.rsplit(".", 1)[-1] for n in wrapped}) == ["q_proj", "v_proj"]
    assert type(tiny_model.model.layers[0].self_attn.k_proj) is torch.nn.Linear
    with pytest.raises(ValueError, match="no nn.Linear named"):
        apply_lora(make_model("tiny"), target_modules=["qkv"])


def test_only_adapter_is_trainable_and_training_leaves_base_bit_identical(tiny_model):
    base = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    apply_lora(tiny_model, r=4, alpha=8)
    mark_only_lora_trainable(tiny_model)
    trainable, total = count_trainable(tiny_model)
    cfg = tiny_model.config
    kv = cfg.num_key_value_heads * cfg.head_dim
    per_layer = 4 * ((64 + 64) + (64 + kv) * 2 + (64 + 64)) + 4 * 3 * (64 + cfg.intermediate_size)
    assert trainable == cfg.num_hidden_layers * per_layer
    assert total == trainable + sum(v.numel() for k, v in base.items() if k != "lm_head.weight")

    tiny_model.train()
    opt = torch.optim.AdamW([p for p in tiny_model.parameters() if p.requires_grad], lr=1e-2)
    x = random_ids(2, 16)
    for _ in range(3):
        tiny_model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    state = tiny_model.state_dict()
    for k, v in base.items():
        assert torch.equal(state[k], v), f"base tensor {k} changed"
    assert any(state[k].abs().sum() > 0 for k in state if ".lora_B." in k)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_merged_equals_unmerged_and_unmerge_restores_base(preset):
    model = make_model(preset)
    base_q = model.model.layers[0].self_attn.q_proj.weight.clone()
    apply_lora(model, r=4, alpha=16)
    _randomise_adapter(model)
    x = random_ids(2, 12)
    with torch.no_grad():
        unmerged = model(x).logits
        merge_lora(model)
        merged = model(x).logits
        assert (merged - unmerged).abs().max() <= 1e-4
        assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, base_q)
        unmerge_lora(model)
        torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, base_q)
        torch.testing.assert_close(model(x).logits, unmerged)


def test_remove_lora_gives_a_plain_checkpoint_with_the_adapted_outputs(tmp_path, tiny_model):
    apply_lora(tiny_model, r=4)
    _randomise_adapter(tiny_model)
    x = random_ids(1, 10)
    with torch.no_grad():
        adapted = tiny_model(x).logits
    remove_lora(tiny_model)
    assert not any(isinstance(m, LoRALinear) for m in tiny_model.modules())
    tiny_model.save_pretrained(tmp_path)
    reloaded = MicroLMForCausalLM.from_pretrained(tmp_path)  # strict: no lora tensors left over
    with torch.no_grad():
        assert (reloaded(x).logits - adapted).abs().max() <= 1e-4


def test_adapter_file_holds_only_adapter_tensors_in_peft_format(tmp_path, tiny_model):
    apply_lora(tiny_model, r=4, alpha=8, dropout=0.05)
    save_adapter(tiny_model, tmp_path, base_model_name_or_path="out/dpo")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors and all(k.startswith("base_model.model.") and (".lora_A." in k or ".lora_B." in k)
                           for k in tensors)
    assert len(tensors) == 2 * len(DEFAULT_TARGETS) * tiny_model.config.num_hidden_layers
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == ("LORA", 4, 8, 0.05)
    assert config["base_model_name_or_path"] == "out/dpo"
    assert sorted(config["target_modules"]) == sorted(DEFAULT_TARGETS)


def test_saving_a_merged_adapter_is_refused(tmp_path, tiny_model):
    apply_lora(tiny_model, r=2)
    merge_lora(tiny_model)
    with pytest.raises(ValueError, match="merged"):
        save_adapter(tiny_model, tmp_path)


def test_load_adapter_reproduces_outputs_and_rejects_mismatches(tmp_path, tiny_model):
    apply_lora(tiny_model, r=4, alpha=8)
    _randomise_adapter(tiny_model)
    save_adapter(tiny_model, tmp_path / "adapter")
    x = random_ids(2, 10)
    with torch.no_grad():
        expected = tiny_model(x).logits
        fresh = load_adapter(make_model("tiny"), tmp_path / "adapter")
        torch.testing.assert_close(fresh(x).logits, expected)

    with pytest.raises(ValueError, match="shape"):  # same names, other rank
        other = make_model("tiny")
        apply_lora(other, r=8, alpha=8)
        load_adapter(other, tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(make_model("tiny"), tmp_path / "nowhere")


def test_peft_loads_our_adapter_onto_the_llama_export(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "base")
    apply_lora(tiny_model, r=4, alpha=8)
    _randomise_adapter(tiny_model)
    save_adapter(tiny_model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "base", config=to_llama_config(tiny_model.config))
    peft_model = peft.PeftModel.from_pretrained(llama, tmp_path / "adapter").eval()
    x = random_ids(2, 12)
    with torch.no_grad():
        assert (peft_model(x).logits - tiny_model(x).logits).abs().max() <= 1e-4


def test_adapter_trained_with_peft_loads_into_our_model(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "base")
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "base", config=to_llama_config(tiny_model.config))
    peft_model = peft.get_peft_model(llama, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    peft_model.save_pretrained(tmp_path / "peft_adapter")
    ours = load_adapter(MicroLMForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "peft_adapter")
    x = random_ids(2, 12)
    with torch.no_grad():
        assert (peft_model.eval()(x).logits - ours.eval()(x).logits).abs().max() <= 1e-4
