"""Start from a released model: read a checkpoint of another family into MicroLM, exactly or not at all.

Accepted, each only where MicroLM computes what the original code computes (anything else is refused with the
reason, never approximated):
    Hugging Face folders   LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MixtralForCausalLM,
                           Qwen3MoeForCausalLM (read with transformers, so sharded / .bin / older layouts all load)
    MiniMind's own formats a transformers folder with `model_type: minimind` (MiniMind2, and minimind-3: recognised
                           by its q_norm / k_norm tensors), and a bare `.pth` state dict with a stated preset
                           (26m, 104m, moe-145m = MiniMind2-Small / MiniMind2 / MiniMind2-MoE; minimind3, minimind3-moe)
    our own checkpoints    `model_type: microlm`

    model = load_pretrained("Qwen3-0.6B")                       # -> MicroLMForCausalLM, Qwen3's logits
    model = load_pretrained("full_sft_512.pth", preset="26m")   # MiniMind2-Small's training output
"""

import json
import math
from pathlib import Path

import torch

from .config import MicroLMConfig
from .model import MicroLMForCausalLM

STOCK_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
IMPORTABLE = ("microlm", "minimind", *STOCK_CLASSES)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# which preset names MiniMind's released .pth files
MINIMIND_PRESETS = ("26m", "104m", "moe-145m", "minimind3", "minimind3-moe")


class NotExact(ValueError):
    """The checkpoint is readable, but MicroLM would not compute exactly what its own code does."""


def model_type(path) -> str | None:
    """config.json's model_type for a folder; None for a bare state-dict file."""
    path = Path(path)
    if path.is_file():
        return None
    return json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")


def is_checkpoint(path) -> bool:
    """A folder with config.json and weights in any layout transformers writes, or a state-dict file."""
    path = Path(path)
    if path.is_file():
        return path.suffix in STATE_DICT_SUFFIXES
    return (path / "config.json").exists() and any((path / f).exists() for f in WEIGHT_FILES)


# ---------------------------------------------------------------------------------------------------------------------
# configs

def _rope_parameters(rope: dict, where: str) -> dict:
    rope = {k: v for k, v in rope.items() if v is not None}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return {"rope_type": "default", "rope_theta": rope.get("rope_theta", 10000.0)}
    if rope_type != "yarn":
        raise NotExact(f"{where}: rope_type {rope_type!r}; MicroLM computes default RoPE and YaRN only")
    if rope.get("mscale") or rope.get("mscale_all_dim") or rope.get("truncate") is False:
        raise NotExact(f"{where}: YaRN with mscale / mscale_all_dim / truncate=False is not the YaRN MicroLM computes")
    keys = ("rope_theta", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor")
    return {"rope_type": "yarn", **{k: rope[k] for k in keys if k in rope}}


def _common(c, where: str) -> dict:
    """The fields every stock decoder config spells as we do (c: a transformers config object)."""
    kw = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
              num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
              num_key_value_heads=c.num_key_value_heads or c.num_attention_heads,
              head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
              hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
              rope_parameters=_rope_parameters(dict(c.rope_parameters or {}), where),
              tie_word_embeddings=bool(c.tie_word_embeddings), initializer_range=c.initializer_range,
              bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    if kw["rope_parameters"]["rope_type"] == "yarn":
        kw["rope_parameters"].setdefault("original_max_position_embeddings", c.max_position_embeddings)
    if getattr(c, "use_sliding_window", False) or "sliding_attention" in (getattr(c, "layer_types", None) or []):
        raise NotExact(f"{where}: sliding-window attention layers; MicroLM attends over the whole context")
    window = getattr(c, "sliding_window", None)
    if c.model_type == "mixtral" and window and window < c.max_position_embeddings:
        raise NotExact(f"{where}: sliding_window={window} < max_position_embeddings; MicroLM has no sliding window")
    return kw


def config_from_stock(c, where: str = "checkpoint") -> MicroLMConfig:
    """The MicroLMConfig that computes the stock config `c` exactly; NotExact with the reason otherwise."""
    t = c.model_type
    if t not in STOCK_CLASSES:
        raise NotExact(f"{where}: model_type {t!r} is not one MicroLM imports ({', '.join(IMPORTABLE)})")
    kw = _common(c, where)
    if t in ("llama", "mixtral", "qwen3", "qwen3_moe") and getattr(c, "attention_bias", False):
        raise NotExact(f"{where}: attention_bias puts a bias on o_proj too; MicroLM's attention_bias is Qwen2's "
                       f"(q/k/v only)")
    if getattr(c, "mlp_bias", False):
        raise NotExact(f"{where}: mlp_bias; MicroLM's feed-forward has no biases")
    kw["attention_bias"] = t == "qwen2"
    kw["qk_norm"] = t in ("qwen3", "qwen3_moe")
    if t == "mixtral":
        if c.router_jitter_noise:
            raise NotExact(f"{where}: router_jitter_noise={c.router_jitter_noise}; MicroLM's router adds no noise")
        kw.update(use_moe=True, num_experts=c.num_local_experts, num_experts_per_tok=c.num_experts_per_tok,
                  n_shared_experts=0, norm_topk_prob=True, router_aux_loss_coef=c.router_aux_loss_coef)
    elif t == "qwen3_moe":
        dense = [i for i in range(c.num_hidden_layers)
                 if i in (c.mlp_only_layers or []) or (i + 1) % c.decoder_sparse_step != 0]
        if dense:
            raise NotExact(f"{where}: layers {dense} are dense (mlp_only_layers / decoder_sparse_step); MicroLM's "
                           f"layers are all dense or all MoE")
        kw.update(use_moe=True, intermediate_size=c.moe_intermediate_size, num_experts=c.num_experts,
                  num_experts_per_tok=c.num_experts_per_tok, n_shared_experts=0,
                  norm_topk_prob=bool(c.norm_topk_prob), router_aux_loss_coef=c.router_aux_loss_coef)
    return MicroLMConfig(**kw)


def config_from_minimind(cfg: dict, keys, where: str = "checkpoint") -> MicroLMConfig:
    """MiniMind's config.json (model_type minimind) as a MicroLMConfig. minimind-3 (q_norm / k_norm tensors present)
    and MiniMind2 share the model_type but not the defaults, so each missing field takes its own version's."""
    v3 = any(k.endswith("self_attn.q_norm.weight") for k in keys)
    hidden = cfg.get("hidden_size", 768 if v3 else 512)
    ffn = cfg.get("intermediate_size") or (64 * math.ceil(hidden * math.pi / 64) if v3
                                           else 64 * ((int(hidden * 8 / 3) + 63) // 64))
    kw = dict(vocab_size=cfg.get("vocab_size", 6400), hidden_size=hidden, intermediate_size=ffn,
              num_hidden_layers=cfg.get("num_hidden_layers", 8), num_attention_heads=cfg.get("num_attention_heads", 8),
              num_key_value_heads=cfg.get("num_key_value_heads") or (4 if v3 else 2), head_dim=cfg.get("head_dim"),
              hidden_act=cfg.get("hidden_act", "silu"), max_position_embeddings=cfg.get("max_position_embeddings", 32768),
              rms_norm_eps=cfg.get("rms_norm_eps", 1e-6 if v3 else 1e-5), qk_norm=v3,
              rope_parameters={"rope_type": "default", "rope_theta": cfg.get("rope_theta", 1e6)},
              tie_word_embeddings=cfg.get("tie_word_embeddings", True), bos_token_id=cfg.get("bos_token_id", 1),
              eos_token_id=cfg.get("eos_token_id", 2), pad_token_id=cfg.get("pad_token_id", 0))
    if cfg.get("inference_rope_scaling") or cfg.get("rope_scaling"):
        if not v3:  # MiniMind2's own frequency blend is not YaRN's ramp
            raise NotExact(f"{where}: MiniMind2's inference_rope_scaling is not standard YaRN; set it to false in "
                           f"config.json to import the model (its trained context is unchanged)")
        s = cfg.get("rope_scaling") or {}
        kw["rope_parameters"] = dict(rope_type="yarn", rope_theta=cfg.get("rope_theta", 1e6),
                                     factor=s.get("factor", 16),
                                     original_max_position_embeddings=s.get("original_max_position_embeddings", 2048),
                                     beta_fast=s.get("beta_fast", 32), beta_slow=s.get("beta_slow", 1),
                                     attention_factor=s.get("attention_factor", 1.0))
    if cfg.get("use_moe"):
        if v3:
            if cfg.get("moe_intermediate_size", ffn) != ffn:
                raise NotExact(f"{where}: moe_intermediate_size {cfg['moe_intermediate_size']} != intermediate_size "
                               f"{ffn}; MicroLM's experts have the dense feed-forward's size")
            kw.update(use_moe=True, num_experts=cfg.get("num_experts", 4), n_shared_experts=0,
                      num_experts_per_tok=cfg.get("num_experts_per_tok", 1),
                      norm_topk_prob=cfg.get("norm_topk_prob", True),
                      router_aux_loss_coef=cfg.get("router_aux_loss_coef", 5e-4))
        else:
            if cfg.get("scoring_func", "softmax") != "softmax":
                raise NotExact(f"{where}: scoring_func {cfg['scoring_func']!r}; MicroLM's router is a softmax")
            top_k = cfg.get("num_experts_per_tok", 2)
            kw.update(use_moe=True, num_experts=cfg.get("n_routed_experts", 4), num_experts_per_tok=top_k,
                      n_shared_experts=cfg.get("n_shared_experts", 1),
                      # MiniMind2 renormalises the top-k weights only when k > 1
                      norm_topk_prob=bool(cfg.get("norm_topk_prob", True)) and top_k > 1,
                      router_aux_loss_coef=cfg.get("aux_loss_alpha", 0.1))
    return MicroLMConfig(**kw)


# ---------------------------------------------------------------------------------------------------------------------
# tensors

def read_state_dict(path) -> dict:
    """Every tensor of a folder (single or sharded safetensors / .bin) or of one state-dict file, on the CPU.
    DDP's `module.` and torch.compile's `_orig_mod.` prefixes (MiniMind's .pth files may carry either) are removed."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        files = []
        for name in WEIGHT_FILES:
            if (path / name).exists():
                files = ([path / f for f in sorted(set(json.loads((path / name).read_text())["weight_map"].values()))]
                         if name.endswith(".index.json") else [path / name])
                break
    sd = {}
    for f in files:
        part = load_file(f) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu", weights_only=True)
        if isinstance(part, dict) and isinstance(part.get("model"), dict):  # {"model": state_dict, ...} bundles
            part = part["model"]
        sd.update(part)
    out = {}
    for name, tensor in sd.items():
        for prefix in ("module.", "_orig_mod."):
            name = name.removeprefix(prefix)
        out[name] = tensor
    return out


def _unfuse_experts(sd: dict, config: MicroLMConfig) -> dict:
    """transformers 5 keeps a MoE layer's experts fused: gate_up_proj (E, 2I, H), gate rows first, and down_proj
    (E, H, I). MicroLM keeps one SwiGLU module per expert."""
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}.mlp.experts."
        gate_up, down = sd.pop(prefix + "gate_up_proj"), sd.pop(prefix + "down_proj")
        for e in range(config.num_experts):
            gate, up = gate_up[e].chunk(2)  # copies: views of one fused tensor would share storage in a checkpoint
            sd[f"{prefix}{e}.gate_proj.weight"], sd[f"{prefix}{e}.up_proj.weight"] = gate.clone(), up.clone()
            sd[f"{prefix}{e}.down_proj.weight"] = down[e].clone()
    return sd


def build(config: MicroLMConfig, sd: dict, where: str = "checkpoint", dtype=torch.float32) -> MicroLMForCausalLM:
    """MicroLMForCausalLM holding exactly the tensors of `sd` (every one used, every parameter given)."""
    sd = {k: v.to(dtype) for k, v in sd.items() if not k.endswith(("rotary_emb.inv_freq", "freqs_cos", "freqs_sin"))}
    embed = sd.get("model.embed_tokens.weight")
    if config.tie_word_embeddings:
        head = sd.setdefault("lm_head.weight", embed)
        if head is not None and embed is not None and not torch.equal(head, embed):
            raise NotExact(f"{where}: tie_word_embeddings is set but lm_head.weight differs from the embedding")
    with torch.device("meta"):
        model = MicroLMForCausalLM(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    wrong = [f"{k} ({list(sd[k].shape)} vs {list(p.shape)})" for k, p in model.state_dict().items()
             if k in sd and sd[k].shape != p.shape]
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}"
                 for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shapes", wrong)) if names]
        raise NotExact(f"{where} does not match MicroLM({_describe(config)}): " + "; ".join(parts))
    model.load_state_dict(sd, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    rotary = model.model.rotary_emb  # non-persistent tables: computed, never read from a checkpoint
    rotary.cos, rotary.sin = rotary.compute_tables(config.max_position_embeddings)
    return model.to(dtype).eval()


def _describe(c: MicroLMConfig) -> str:
    moe = f", {c.num_experts} experts top-{c.num_experts_per_tok} + {c.n_shared_experts} shared" if c.use_moe else ""
    return (f"hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads}/{c.num_key_value_heads} "
            f"heads, FFN {c.intermediate_size}{moe}")


# ---------------------------------------------------------------------------------------------------------------------
# the one entry point

def load_pretrained(path, preset: str | None = None, dtype=torch.float32) -> MicroLMForCausalLM:
    """Any accepted checkpoint (see the module docstring) as a MicroLMForCausalLM in `dtype`.

    NotExact (a ValueError) names what does not map; FileNotFoundError a path without a checkpoint."""
    path = Path(path)
    if not is_checkpoint(path):
        raise FileNotFoundError(f"no checkpoint at {path}: expected a folder with config.json and "
                                f"{' / '.join(WEIGHT_FILES[::2])}, or a {' / '.join(STATE_DICT_SUFFIXES)} state dict")
    if path.is_file():
        if not preset:
            raise ValueError(f"{path} holds tensors only: state its architecture with --preset "
                             f"({', '.join(MINIMIND_PRESETS)}; 26m / 104m / moe-145m are MiniMind2-Small / MiniMind2 / "
                             f"MiniMind2-MoE, minimind3 / minimind3-moe are minimind-3's)")
        return build(MicroLMConfig.from_preset(preset), read_state_dict(path), f"{path} (preset {preset})", dtype)
    kind = model_type(path)
    if kind == "microlm":
        return MicroLMForCausalLM.from_pretrained(path, dtype=dtype)
    if kind == "minimind":
        sd = read_state_dict(path)
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        return build(config_from_minimind(cfg, sd, str(path)), sd, str(path), dtype)
    if kind not in STOCK_CLASSES:
        raise NotExact(f"{path}: model_type {kind!r} is not one MicroLM imports ({', '.join(IMPORTABLE)})")
    from transformers import AutoConfig, AutoModelForCausalLM

    config = config_from_stock(AutoConfig.from_pretrained(path), str(path))  # refuse before reading the weights
    stock = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if type(stock).__name__ != STOCK_CLASSES[kind]:
        raise NotExact(f"{path}: {type(stock).__name__} is not {STOCK_CLASSES[kind]}")
    sd = dict(stock.state_dict())
    del stock
    if config.use_moe:
        sd = _unfuse_experts(sd, config)
    return build(config, sd, str(path), dtype)


def load_for_inference(path, preset: str | None = None, dtype=torch.float32):
    """(model, note): MicroLM where the checkpoint maps exactly; any other transformers causal LM runs as its stock
    class (exact too: it is the original code), with a note saying so."""
    try:
        return load_pretrained(path, preset, dtype), None
    except NotExact as e:
        if Path(path).is_file() or model_type(path) in ("minimind", "microlm"):
            raise
        from transformers import AutoModelForCausalLM

        return (AutoModelForCausalLM.from_pretrained(path, dtype=dtype),
                f"running the stock transformers class, not MicroLM: {e}")
