"""Stock Hugging Face folders of our models: the transformers class that computes a model exactly (same tensor names,
our config translated; MoE experts fused as transformers keeps them). scripts/convert_model.py exports with it; the
vLLM rollout engine (trainer/rollout.py) serves and refreshes the policy through it."""

from pathlib import Path

import torch

from .config import to_llama_config, to_mixtral_config, to_qwen2_config, to_qwen3_config, to_qwen3_moe_config


def generation_config(model):
    from transformers import GenerationConfig

    c = model.config
    return GenerationConfig(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                            do_sample=True, temperature=0.85, top_p=0.85, max_new_tokens=512)


def _save_stock(model_class, hf_config, state_dict, model, tokenizer, out) -> Path:
    """Build a stock transformers model without allocating, take our tensors, and save it with the tokenizer."""
    with torch.device("meta"):
        stock = model_class(hf_config)
    stock.load_state_dict(state_dict, strict=True, assign=True)
    stock.generation_config = generation_config(model)
    stock.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)


def fuse_experts(sd: dict, config) -> dict:
    """Mixtral and Qwen3-MoE (transformers 5) keep a layer's experts fused: gate_up_proj (E, 2I, H) with the gate rows
    first, down_proj (E, H, I)."""
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}.mlp.experts."
        experts = range(config.num_experts)
        sd[prefix + "gate_up_proj"] = torch.stack([torch.cat([sd.pop(f"{prefix}{e}.gate_proj.weight"),
                                                              sd.pop(f"{prefix}{e}.up_proj.weight")]) for e in experts])
        sd[prefix + "down_proj"] = torch.stack([sd.pop(f"{prefix}{e}.down_proj.weight") for e in experts])
    return sd


# model_type -> (stock class name, config translation); model.config.stock_family() picks the one that is exact
STOCK_EXPORTS = {"llama": ("LlamaForCausalLM", to_llama_config), "qwen2": ("Qwen2ForCausalLM", to_qwen2_config),
                 "qwen3": ("Qwen3ForCausalLM", to_qwen3_config), "mixtral": ("MixtralForCausalLM", to_mixtral_config),
                 "qwen3_moe": ("Qwen3MoeForCausalLM", to_qwen3_moe_config)}


def stock_state_dict(model) -> dict:
    """The model's tensors under the stock class's names (what a stock folder and vLLM load)."""
    sd = model.state_dict()
    return fuse_experts(sd, model.config) if model.config.use_moe else sd


def export_stock(model, tokenizer, out, family: str) -> Path:
    """The stock transformers class that computes this model exactly (same tensor names; MoE experts fused)."""
    import transformers

    class_name, to_config = STOCK_EXPORTS[family]
    return _save_stock(getattr(transformers, class_name), to_config(model.config), stock_state_dict(model), model,
                       tokenizer, out)
