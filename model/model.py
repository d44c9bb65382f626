"""MicroLM: a decoder-only Transformer (pre-norm RMSNorm, RoPE/YaRN, grouped-query attention, SwiGLU, optional MoE).

Read top to bottom in the order data flows: norm -> rotary -> attention -> feed-forward (dense or MoE) -> block ->
model -> causal-LM head. Parameter names are Hugging Face Llama's, so a dense checkpoint loads into
`transformers.LlamaForCausalLM` as it is.
"""

import math

import torch
import torch.nn as nn
import torch.utils.checkpoint
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .config import MicroLMConfig


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        # the mean of squares in fp32: bf16 loses too much precision over 512+ channels
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Rotary position embeddings (half-split layout, as Llama), with optional YaRN frequency scaling

def rope_inv_freq(config: MicroLMConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the attention (cos/sin) scale for the config's rope_parameters."""
    params = config.rope_parameters
    base, dim = params["rope_theta"], config.head_dim
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if params.get("rope_type", "default") != "yarn":
        return inv_freq, 1.0
    # YaRN (arXiv 2309.00071): low-frequency dimensions (many wavelengths longer than the trained context) are
    # interpolated by `factor`, high-frequency ones kept, with a linear ramp between; logits are rescaled by mscale.
    factor = params["factor"]
    orig_ctx = params["original_max_position_embeddings"]
    beta_fast, beta_slow = params.get("beta_fast") or 32.0, params.get("beta_slow") or 1.0

    def dim_for_rotations(n_rot):  # the dimension index whose wavelength fits n_rot times into orig_ctx
        return dim * math.log(orig_ctx / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dim_for_rotations(beta_fast)), 0)
    high = min(math.ceil(dim_for_rotations(beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    mscale = params.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    return inv_freq, mscale


class RotaryEmbedding(nn.Module):
    """cos/sin tables computed once for max_position_embeddings and looked up by position id."""

    def __init__(self, config: MicroLMConfig):
        super().__init__()
        self.config = config
        cos, sin = self.compute_tables(config.max_position_embeddings)
        # non-persistent: not in checkpoints; MicroLMPreTrainedModel._init_weights recomputes them after loading
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def compute_tables(self, length: int, device=None):
        inv_freq, mscale = rope_inv_freq(self.config)
        t = torch.arange(length, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq.to(device))
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * mscale, emb.sin() * mscale

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        # longer than configured: extend the tables (rare, slow path; a compiled graph keeps to the configured length)
        if not torch.compiler.is_compiling() and position_ids.max() >= self.cos.shape[0]:
            with torch.inference_mode(False):  # buffers made during a decode must stay ordinary tensors
                self.cos, self.sin = self.compute_tables(int(position_ids.max()) + 1, self.cos.device)
        return self.cos[position_ids].to(dtype), self.sin[position_ids].to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, T, D) -> (B, 1, T, D): broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# ----------------------------------------------------------------------------------------------------------------------
# Attention and feed-forward

class Attention(nn.Module):
    def __init__(self, config: MicroLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.dropout = config.dropout
        bias = config.attention_bias  # Qwen2: q/k/v carry biases, o_proj none
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_norm:  # Qwen3 / minimind-3: each head's q and k normalised before RoPE (steadier attention logits)
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, attn_mask=None, cache: Cache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        # SDPA picks flash / memory-efficient kernels; enable_gqa shares each kv head across its query group
        # without materialising repeated keys. attn_mask=None with T>1 means plain causal (no cache, no padding).
        gqa = self.n_kv_heads != self.n_heads
        if gqa and attn_mask is not None and q.device.type == "cuda":
            # with a mask (packed rows, padding) CUDA's memory-efficient kernel is the one that applies, and it takes
            # no enable_gqa: repeat the kv heads rather than fall back to the O(T^2)-memory math kernel
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, 1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, 1)
            gqa = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_dropout(self.o_proj(y))


class FeedForward(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, config: MicroLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


class MoEFeedForward(nn.Module):
    """Top-k routed SwiGLU experts plus always-on shared experts; returns (output, load-balancing aux loss)."""

    def __init__(self, config: MicroLMConfig):
        super().__init__()
        self.top_k, self.n_experts = config.num_experts_per_tok, config.num_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.aux_loss_coef = config.router_aux_loss_coef
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(config) for _ in range(config.num_experts))
        self.shared_experts = nn.ModuleList(FeedForward(config) for _ in range(config.n_shared_experts))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(x).float(), dim=-1)  # (N, E), router in fp32
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)

        # batched dispatch: sort the N*k (token, expert) pairs by expert and run every expert once on its slice.
        # Every expert runs, even on zero tokens, so each one is in the graph and gets a gradient (no DDP hang).
        flat_experts = experts.flatten()
        order = flat_experts.argsort(stable=True)
        token_idx = order // self.top_k
        counts = torch.bincount(flat_experts, minlength=self.n_experts).tolist()
        chunks = x[token_idx].split(counts)
        out = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks)])
        out = out * weights.flatten()[order].unsqueeze(-1).to(out.dtype)
        # summed in fp32: under autocast the experts return bf16/fp16 while x (the residual stream) stays fp32
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, token_idx, out.float())
        y = y.to(out.dtype)
        for shared in self.shared_experts:
            y = y + shared(x)

        # Switch-Transformer balance loss: E * sum_e (fraction of assignments to e) * (mean router prob of e)
        load = F.one_hot(experts, self.n_experts).float().mean(dim=(0, 1))
        aux_loss = self.aux_loss_coef * self.n_experts * (load * probs.mean(dim=0)).sum()
        return y.view(shape), aux_loss


class Block(GradientCheckpointingLayer):  # transformers' wrapper: gradient_checkpointing_enable() recomputes per block
    def __init__(self, config: MicroLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, x, cos, sin, attn_mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache)
        h = self.mlp(self.post_attention_layernorm(x))
        if isinstance(h, tuple):
            h, aux_loss = h
            return x + h, aux_loss
        return x + h, None


# ----------------------------------------------------------------------------------------------------------------------
# Model

def build_attention_mask(attention_mask: torch.Tensor | None, q_len: int, past_len: int,
                         kv_len: int | None = None, device=None) -> torch.Tensor | None:
    """Boolean SDPA mask (True = attend), or None when SDPA's own causal path or no mask at all is exact.

    Needed for padding (a 0 in `attention_mask`, e.g. left-padded generation), for several new tokens on top of a
    cache (SDPA's is_causal aligns the diagonal top-left, which is wrong when q_len != kv_len), and for a static
    (pre-allocated) cache, which hands back all `kv_len` slots, the ones not yet written included.
    """
    past_len = int(past_len)
    kv_len = past_len + q_len if kv_len is None else kv_len
    static = kv_len != past_len + q_len
    has_padding = attention_mask is not None and not bool(attention_mask.all())
    if not has_padding and not static and (q_len == 1 or past_len == 0):
        return None
    device = attention_mask.device if attention_mask is not None else device
    q_pos = torch.arange(past_len, past_len + q_len, device=device)
    mask = torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None]  # (q_len, kv_len) causal
    if has_padding:
        keys = attention_mask.bool()
        keys = F.pad(keys, (0, kv_len - keys.shape[1])) if keys.shape[1] < kv_len else keys[:, -kv_len:]
        mask = mask[None, None] & keys[:, None, None, :]
        # a padding query would see no key at all (NaN softmax); let it see itself, its output is never used
        mask = mask | (torch.arange(kv_len, device=device)[None, :] == q_pos[:, None])
    return mask


def document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean mask for packed rows: causal within each document, nothing across documents.

    A document starts wherever a position does not follow its predecessor by one (transformers' padding-free
    convention, so a stock teacher reads the same rows the same way): a row's positions 0 1 2 0 1 0 1 2 3 hold three
    documents; a row may start inside a document (positions 37 38 ...)."""
    T = position_ids.shape[-1]
    starts = F.pad(position_ids[:, 1:] != position_ids[:, :-1] + 1, (1, 0), value=True)
    doc = starts.cumsum(-1)
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


class MicroLMPreTrainedModel(PreTrainedModel):
    config_class = MicroLMConfig
    config: MicroLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, RotaryEmbedding):
            cos, sin = module.compute_tables(module.cos.shape[0])
            init.copy_(module.cos, cos)
            init.copy_(module.sin, sin)


class MicroLMModel(MicroLMPreTrainedModel):
    def __init__(self, config: MicroLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if attention_mask is not None and attention_mask.dim() == 4:
            # generate() prepares a (B, 1, T, kv) mask (True = attend) for a static cache. Row i attends exactly the
            # real tokens up to query i, so their count is its position (left padding included). No host sync and
            # no data-dependent branch here, so the decode step compiles to one graph.
            attn_mask = attention_mask.bool()
            if position_ids is None:
                position_ids = (attn_mask[:, 0].sum(-1) - 1).clamp(min=0)
        elif position_ids is not None and attention_mask is None and cache is None and T > 1:
            # position ids without a mask or a cache: packed documents (chat packing, --doc_mask), each kept to itself
            attn_mask = document_mask(position_ids)
        else:
            past_len = int(cache.get_seq_length()) if cache is not None else 0
            if position_ids is None:
                if attention_mask is not None and not bool(attention_mask.all()):
                    # left padding: count positions from each row's first real token, as if the row were alone
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
                else:
                    position_ids = torch.arange(past_len, past_len + T, device=x.device).expand(B, T)
            # a DynamicCache returns past + new keys; a StaticCache all of its pre-allocated slots
            kv_len = cache.get_mask_sizes(T, 0)[0] if cache is not None else T
            attn_mask = build_attention_mask(attention_mask, T, past_len, kv_len, x.device)
        cos, sin = self.rotary_emb(position_ids, x.dtype)

        x = self.dropout(x)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            x, layer_aux = layer(x, cos, sin, attn_mask, cache)
            if layer_aux is not None:
                aux_loss = aux_loss + layer_aux
        return self.norm(x), aux_loss


# Vocabularies from this size on (Qwen's 151,936, Llama 3's 128,256) compute the loss in chunks of positions whose
# logits are freed after use and recomputed in the backward pass: B x T x V fp32 logits would otherwise dominate memory.
LARGE_VOCAB = 32768
LOSS_CHUNK_ELEMENTS = 2 ** 26  # logits per chunk: 256 MiB in fp32


class MicroLMForCausalLM(MicroLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MicroLMConfig):
        super().__init__(config)
        self.model = MicroLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, reduction="mean", **kwargs):
        """Logits, and with `labels` the shifted cross-entropy (ignore_index -100) plus the MoE balance loss.

        reduction="none" / "sum" (the training engine's form): `loss` is the per-position cross-entropy (B, T-1)
        (0 where ignored) or its sum, without the balance loss (in `aux_loss`), and no logits are returned; with a
        large vocabulary it is computed in chunks that never hold the whole batch's logits.

        `cache` (transformers 5 name; `past_key_values` accepted too) is a `Cache`; with `use_cache=True` and no
        cache a new `DynamicCache` is made and returned. `logits_to_keep=n` computes logits for the last n
        positions only (0 = all): generation needs just the last.
        """
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else (cache is not None)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        hidden, aux_loss = self.model(input_ids, attention_mask, position_ids, cache if use_cache else None,
                                      inputs_embeds)
        if labels is not None and reduction != "mean":
            ce = self.token_cross_entropy(hidden, labels)
            return MoeCausalLMOutputWithPast(loss=ce.sum() if reduction == "sum" else ce, aux_loss=aux_loss,
                                             cache=cache if use_cache else None)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
            if self.config.use_moe:
                loss = loss + aux_loss
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits,
                                         cache=cache if use_cache else None)

    def token_cross_entropy(self, hidden, labels) -> torch.Tensor:
        """(B, T-1) next-token cross-entropy from the final hidden states, 0 at ignored (-100) labels."""
        h, y = hidden[:, :-1], labels[:, 1:]
        shape = y.shape
        h, y = h.reshape(-1, h.shape[-1]), y.reshape(-1)
        keep = y != -100
        # chat rows label only the replies: no logits for the prompt's positions (on the demo's tool chats ~60% of
        # them). Selecting them is data-dependent, which torch.compile would recompile for: compiled, all positions
        if not torch.compiler.is_compiling() and not keep.all():
            out = h.new_zeros(y.shape, dtype=torch.float32)
            return out.masked_scatter(keep, self._token_cross_entropy(h[keep], y[keep])).view(shape)
        return self._token_cross_entropy(h, y).view(shape)

    def _token_cross_entropy(self, h, y) -> torch.Tensor:
        def ce(h, y):
            return F.cross_entropy(self.lm_head(h).float(), y, ignore_index=-100, reduction="none")

        chunk = max(1, LOSS_CHUNK_ELEMENTS // self.config.vocab_size)
        if self.config.vocab_size < LARGE_VOCAB or y.numel() <= chunk:
            return ce(h, y)
        recompute = torch.is_grad_enabled()
        parts = [torch.utils.checkpoint.checkpoint(ce, h[i:i + chunk], y[i:i + chunk], use_reentrant=False)
                 if recompute else ce(h[i:i + chunk], y[i:i + chunk]) for i in range(0, y.numel(), chunk)]
        return torch.cat(parts)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained` that refuses a checkpoint whose tensors do not match the model.

        transformers only warns about missing / unexpected / resized tensors; a silently half-initialised model is
        worse than an error.
        """
        want_info = kwargs.pop("output_loading_info", False)
        # let transformers finish loading so that the error below can name every offending tensor and shape
        kwargs.setdefault("ignore_mismatched_sizes", True)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = []
        for key in ("missing_keys", "unexpected_keys"):
            if names := sorted(info.get(key) or []):
                problems.append(f"{key.replace('_', ' ')}: {', '.join(names[:8])}" + (" ..." if len(names) > 8 else ""))
        if shapes := sorted(info.get("mismatched_keys") or []):
            problems.append("wrong shapes: " + ", ".join(f"{name} (checkpoint {list(ckpt)} vs model {list(ours)})"
                                                          for name, ckpt, ours in shapes[:8]))
        if problems:
            where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise ValueError(f"checkpoint {where} does not match {cls.__name__}: " + "; ".join(problems))
        return (model, info) if want_info else model

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, forward + backward: 6 per matmul weight a token passes through (active experts
        only; the embedding lookup is not a matmul, the output head is) + 12·L·d·T for attention scores and values."""
        c = self.config
        counts = self.param_counts()
        n = counts["active"] - counts["embedding"] + self.lm_head.weight.numel() * c.tie_word_embeddings
        return 6 * n + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len

    def param_counts(self) -> dict:
        """Total parameters (tied embeddings once) and the parameters active per token (differs for MoE)."""
        total = sum(p.numel() for p in self.parameters())
        active = total
        cfg = self.config
        if cfg.use_moe:
            expert = sum(p.numel() for p in self.model.layers[0].mlp.experts[0].parameters())
            active -= cfg.num_hidden_layers * (cfg.num_experts - cfg.num_experts_per_tok) * expert
        return {"total": total, "active": active, "embedding": self.model.embed_tokens.weight.numel()}
