"""MicroLMConfig: the one configuration of the MicroLM decoder, with Hugging Face Llama field names.

Presets reproduce MiniMind2's published sizes (tied embeddings counted once):
    26m       512 hidden,  8 layers, 8 q / 2 kv heads, FFN 1408                       -> 25.83M
    104m      768 hidden, 16 layers, 8 q / 2 kv heads, FFN 2048                       -> 104.03M
    moe-145m  640 hidden,  8 layers, 8 q / 2 kv heads, FFN 1728, 4 routed top-2 + 1 shared -> 145.03M
    minimind3 768 hidden,  8 layers, 8 q / 4 kv heads, FFN 2432, q/k RMSNorm (Qwen3's)      -> 63.91M
    minimind3-moe  the same with 4 routed experts of FFN 2432, top-1, no shared expert -> 198.4M, 63.9M active
    demo      ~1.6M parameters: the embedded demo pipeline on a laptop CPU
    tiny      a few-hundred-thousand-parameter model for CPU tests
"""

import math

from transformers import PretrainedConfig

PRESETS = {
    "26m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=1408),
    "104m": dict(hidden_size=768, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=2048),
    "moe-145m": dict(hidden_size=640, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                     intermediate_size=1728, use_moe=True, num_experts=4, num_experts_per_tok=2,
                     n_shared_experts=1),
    # minimind-3's dense architecture (Qwen3's: per-head RMSNorm on q and k), exported as stock Qwen3ForCausalLM
    "minimind3": dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                      intermediate_size=2432, rms_norm_eps=1e-6, qk_norm=True),
    # minimind-3-moe ("198M-A64M"): 4 experts, top-1, no shared expert; exported as stock Qwen3MoeForCausalLM
    "minimind3-moe": dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                          intermediate_size=2432, rms_norm_eps=1e-6, qk_norm=True, use_moe=True, num_experts=4,
                          num_experts_per_tok=1, n_shared_experts=0, router_aux_loss_coef=5e-4),
    "demo": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=384, max_position_embeddings=2048),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=192, max_position_embeddings=2048),
    "tiny-moe": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=96, max_position_embeddings=2048, use_moe=True, num_experts=4,
                     num_experts_per_tok=2, n_shared_experts=1),
}


def default_intermediate_size(hidden_size: int) -> int:
    # SwiGLU keeps the parameter count of a 4x MLP with 8/3 x hidden, rounded up to a multiple of 64 (MiniMind's rule)
    return 64 * math.ceil(hidden_size * 8 / 3 / 64)


class MicroLMConfig(PretrainedConfig):
    model_type = "microlm"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 6400,
        hidden_size: int = 512,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = 2,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        rms_norm_eps: float = 1e-5,
        qk_norm: bool = False,
        attention_bias: bool = False,
        rope_parameters: dict | None = None,
        dropout: float = 0.0,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        pad_token_id: int = 0,
        # mixture of experts
        use_moe: bool = False,
        num_experts: int = 4,
        num_experts_per_tok: int = 2,
        n_shared_experts: int = 1,
        router_aux_loss_coef: float = 0.01,
        norm_topk_prob: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size or default_intermediate_size(hidden_size)
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.qk_norm = qk_norm  # RMSNorm over each head's q and k before RoPE (Qwen3, minimind-3)
        self.attention_bias = attention_bias  # biases on q/k/v, none on o (Qwen2)
        self.dropout = dropout
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.use_moe = use_moe
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_shared_experts = n_shared_experts
        self.router_aux_loss_coef = router_aux_loss_coef
        self.norm_topk_prob = norm_topk_prob
        self._validate_shapes()
        if self.head_dim is None:
            self.head_dim = hidden_size // num_attention_heads
        # transformers 5 keeps RoPE settings in `rope_parameters`; the legacy `rope_theta=` / `rope_scaling=` keywords
        # (MiniMind's spelling) are folded into it by the base class.
        kwargs.setdefault("rope_theta", 1e6)
        self.rope_parameters = rope_parameters
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
        self._validate_rope()

    def _validate_shapes(self):
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads} (give head_dim explicitly)")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim is not None and self.head_dim % 2 != 0:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.use_moe and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts="
                             f"{self.num_experts}")

    def _validate_rope(self):
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type not in ("default", "yarn"):
            raise ValueError(f"rope_type={rope_type!r} is not supported; use 'default' or 'yarn'")
        if rope_type == "yarn" and not self.rope_parameters.get("factor"):
            raise ValueError(f"YaRN needs a scaling 'factor' > 1 in rope_parameters, got {self.rope_parameters}")

    @property
    def rope_theta(self) -> float:
        return (self.rope_parameters or {}).get("rope_theta", 1e6)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MicroLMConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def yarn_rope_parameters(factor: float = 16.0, original_max_position_embeddings: int = 2048,
                         rope_theta: float = 1e6, beta_fast: float = 32.0, beta_slow: float = 1.0) -> dict:
    """rope_parameters for YaRN context extension, in the form transformers' Llama reads as well."""
    return dict(rope_type="yarn", rope_theta=rope_theta, factor=factor,
                original_max_position_embeddings=original_max_position_embeddings,
                beta_fast=beta_fast, beta_slow=beta_slow)


def _stock_kwargs(config: MicroLMConfig) -> dict:
    """The settings every stock transformers decoder config spells as we do."""
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters=dict(config.rope_parameters), tie_word_embeddings=config.tie_word_embeddings,
        initializer_range=config.initializer_range,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)


def _refuse_qwen_parts(config: MicroLMConfig, family: str):
    """Llama and Mixtral have no q/k norm and put a bias on all four projections or none: refuse, never approximate."""
    parts = [name for name, on in (("qk_norm", config.qk_norm), ("attention_bias", config.attention_bias)) if on]
    if parts:
        raise ValueError(f"{', '.join(parts)}: {family} has no exact equivalent (Qwen3 has qk_norm, Qwen2 q/k/v "
                         f"biases)")


def to_llama_config(config: MicroLMConfig):
    """The stock `transformers.LlamaConfig` a dense MicroLM checkpoint loads into unchanged (same tensor names)."""
    from transformers import LlamaConfig

    if config.use_moe:
        raise ValueError("a MoE MicroLM has no Llama equivalent; export it with its own code (auto_map) instead")
    _refuse_qwen_parts(config, "Llama")
    return LlamaConfig(**_stock_kwargs(config), attention_bias=False, mlp_bias=False)


def to_mixtral_config(config: MicroLMConfig):
    """The stock `transformers.MixtralConfig` for a MoE MicroLM that Mixtral computes exactly: softmax router,
    renormalised top-k, no shared experts. ValueError for any other MoE (it keeps our own code instead)."""
    from transformers import MixtralConfig

    if not config.use_moe or config.n_shared_experts or not config.norm_topk_prob:
        raise ValueError("only a MoE without shared experts and with norm_topk_prob=True matches Mixtral")
    _refuse_qwen_parts(config, "Mixtral")
    return MixtralConfig(**_stock_kwargs(config), num_local_experts=config.num_experts,
                         num_experts_per_tok=config.num_experts_per_tok,
                         router_aux_loss_coef=config.router_aux_loss_coef, sliding_window=None)


def to_qwen2_config(config: MicroLMConfig):
    """Stock `Qwen2Config` for a dense MicroLM with q/k/v biases (attention_bias) and no q/k norm."""
    from transformers import Qwen2Config

    if config.use_moe or config.qk_norm or not config.attention_bias:
        raise ValueError("Qwen2 matches exactly a dense model with attention_bias and without qk_norm")
    return Qwen2Config(**_stock_kwargs(config), use_sliding_window=False)


def to_qwen3_config(config: MicroLMConfig):
    """Stock `Qwen3Config` for a dense MicroLM with per-head q/k RMSNorm (qk_norm) and no biases (minimind-3)."""
    from transformers import Qwen3Config

    if config.use_moe or not config.qk_norm or config.attention_bias:
        raise ValueError("Qwen3 matches exactly a dense model with qk_norm and without attention_bias")
    return Qwen3Config(**_stock_kwargs(config), attention_bias=False, use_sliding_window=False)


def to_qwen3_moe_config(config: MicroLMConfig):
    """Stock `Qwen3MoeConfig` for a qk_norm MoE without shared experts (minimind-3-moe): every layer sparse, the
    experts of size intermediate_size, softmax router with norm_topk_prob as ours."""
    from transformers import Qwen3MoeConfig

    if not config.use_moe or config.n_shared_experts or not config.qk_norm or config.attention_bias:
        raise ValueError("Qwen3-MoE matches exactly a qk_norm MoE without shared experts and without biases")
    return Qwen3MoeConfig(**_stock_kwargs(config), moe_intermediate_size=config.intermediate_size,
                          num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                          norm_topk_prob=config.norm_topk_prob, router_aux_loss_coef=config.router_aux_loss_coef,
                          decoder_sparse_step=1, mlp_only_layers=[], attention_bias=False, use_sliding_window=False)


def stock_family(config: MicroLMConfig) -> str | None:
    """The stock transformers model_type that computes this MicroLM exactly, or None (then only our code does)."""
    if config.qk_norm and config.attention_bias:
        return None
    if not config.use_moe:
        return "qwen3" if config.qk_norm else "qwen2" if config.attention_bias else "llama"
    if config.n_shared_experts or config.attention_bias:
        return None
    if config.qk_norm:
        return "qwen3_moe"
    return "mixtral" if config.norm_topk_prob else None
