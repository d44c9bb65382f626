"""The MicroLM decoder: sizes, causality, KV cache, padding, GQA, MoE, YaRN, generate()."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import make_model, random_ids
from transformers import TextIteratorStreamer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from model import MicroLMConfig, MicroLMForCausalLM, yarn_rope_parameters
from model.model import MoEFeedForward, rope_inv_freq

# ---------------------------------------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("preset,total,active", [
    ("26m", 25.83, 25.83),
    ("104m", 104.03, 104.03),
    ("moe-145m", 145.03, 91.95),  # active: 2 of 4 routed experts + the shared one
])
def test_preset_parameter_counts_match_minimind2(preset, total, active):
    with torch.device("meta"):  # count without allocating 145M parameters
        model = MicroLMForCausalLM(MicroLMConfig.from_preset(preset))
    counts = model.param_counts()
    assert round(counts["total"] / 1e6, 2) == total
    assert round(counts["active"] / 1e6, 2) == active


def test_tied_embeddings_share_one_tensor(tiny_model):
    assert tiny_model.lm_head.weight is tiny_model.model.embed_tokens.weight


def test_init_std_is_0_02():
    model = make_model("26m")
    w = model.model.layers[0].mlp.up_proj.weight
    assert abs(w.std().item() - 0.02) < 1e-3
    assert torch.equal(model.model.layers[0].input_layernorm.weight, torch.ones(512))


@pytest.mark.parametrize("kwargs,message", [
    (dict(hidden_size=100, num_attention_heads=8), "hidden_size=100"),
    (dict(num_attention_heads=8, num_key_value_heads=3), "num_key_value_heads=3"),
    (dict(use_moe=True, num_experts=4, num_experts_per_tok=5), "num_experts_per_tok=5"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), "rope_type='linear'"),
])
def test_bad_config_names_the_offending_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MicroLMConfig(**kwargs)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown preset '7b'.*26m"):
        MicroLMConfig.from_preset("7b")


# ---------------------------------------------------------------------------------------------------------- forward

@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_causality_future_tokens_never_change_past_logits(preset):
    model = make_model(preset)
    x = random_ids(1, 16)
    t = 9
    y = x.clone()
    y[0, t] = (x[0, t] + 1) % 6400
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t] - b[:, t]).abs().max() > 1e-4  # ... and the changed position itself does change


def test_loss_is_shifted_cross_entropy_ignoring_minus_100(tiny_model):
    x = random_ids(2, 10)
    labels = x.clone()
    labels[0, :4] = -100
    out = tiny_model(x, labels=labels)
    logits = out.logits[:, :-1]
    expected = F.cross_entropy(logits.reshape(-1, 6400), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    # an untrained model's loss is about ln(vocab)
    assert abs(out.loss.item() - math.log(6400)) < 0.5


@pytest.mark.parametrize("preset,overrides", [
    ("tiny", {}),                                              # GQA 4 q / 2 kv
    ("tiny", dict(num_key_value_heads=4)),                     # plain MHA
    ("tiny", dict(num_key_value_heads=1)),                     # MQA
    ("tiny-moe", {}),
    ("tiny", dict(rope_parameters=yarn_rope_parameters(4.0, 16))),
])
def test_cached_decoding_equals_full_forward(preset, overrides):
    model = make_model(preset, **overrides)
    x = random_ids(2, 20)
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :7], use_cache=True)
        pieces, cache = [out.logits], out.cache
        pieces.append(model(x[:, 7:11], cache=cache, use_cache=True).logits)  # several new tokens on a cache
        for t in range(11, 20):
            pieces.append(model(x[:, t:t + 1], cache=cache, use_cache=True).logits)
    assert cache.get_seq_length() == 20
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_left_padded_batch_matches_each_row_alone(preset):
    model = make_model(preset)
    short, long = random_ids(1, 5, seed=1), random_ids(1, 11, seed=2)
    batch = torch.cat([F.pad(short, (6, 0), value=0), long])
    mask = torch.ones_like(batch)
    mask[0, :6] = 0
    with torch.no_grad():
        logits = model(batch, attention_mask=mask).logits[:, -1]
        alone = [model(short).logits[0, -1], model(long).logits[0, -1]]
    for row in range(2):
        assert (logits[row] - alone[row]).abs().max().item() <= 1e-4
    assert torch.isfinite(model(batch, attention_mask=mask).logits).all()  # padding queries do not produce NaN


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_static_kv_cache_decodes_like_the_dynamic_one(preset):
    """generate(cache_implementation="static"): a pre-allocated cache whose unwritten slots must stay masked, with
    positions read from generate()'s 4-D mask; left padding included."""
    from transformers import StaticCache

    model = make_model(preset, seed=3, tie_word_embeddings=False)
    ids = random_ids(2, 12, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    greedy = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, attention_mask=mask)
    dynamic = model.generate(ids, **greedy)
    static = model.generate(ids, cache_implementation="static", **greedy)
    assert torch.equal(static, dynamic)
    # logits too, step by step on a StaticCache longer than needed
    x = random_ids(1, 20)
    with torch.no_grad():
        full = model(x).logits
        cache = StaticCache(config=model.config, max_cache_len=64)
        pieces = [model(x[:, :7], cache=cache, use_cache=True).logits]
        pieces += [model(x[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(7, 20)]
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-4


def _reference_attention(attn, x, cos, sin):
    """Textbook multi-head attention with explicit repeat of kv heads, softmax(QK^T / sqrt(d)) with a causal mask."""
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    rot = lambda t: torch.cat((-t[..., attn.head_dim // 2:], t[..., :attn.head_dim // 2]), -1)  # noqa: E731
    q, k = q * cos[:, None] + rot(q) * sin[:, None], k * cos[:, None] + rot(k) * sin[:, None]
    rep = attn.n_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    return attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_attention_equals_textbook_multi_head_attention(n_kv):
    model = make_model("tiny", num_key_value_heads=n_kv)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 9, 64)
    pos = torch.arange(9).expand(2, 9)
    cos, sin = model.model.rotary_emb(pos, x.dtype)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin), _reference_attention(attn, x, cos, sin), atol=1e-5, rtol=1e-4)


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa = make_model("tiny", num_key_value_heads=2)
    mha = make_model("tiny", num_key_value_heads=4)
    sd = gqa.state_dict()
    hd = gqa.config.head_dim
    for name, tensor in list(sd.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # each kv head serves 2 query heads
            sd[name] = tensor.view(2, hd, -1).repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(sd)
    x = random_ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(gqa(x).logits, mha(x).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_bf16_autocast_trains_close_to_fp32(preset):
    """The engine's default precision: forward and backward under bf16 autocast (fp32 weights and residual
    stream, bf16 matmuls -- the MoE combine once mixed the two and crashed)."""
    model, x = make_model(preset), random_ids(2, 16)
    ref = model(x, labels=x)
    ref.loss.backward()
    ref_grad = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, labels=x)
    low.loss.backward()
    assert low.logits.dtype == torch.bfloat16
    assert (low.logits.float() - ref.logits).abs().max() < 0.1
    assert abs(low.loss.item() - ref.loss.item()) < 0.02
    grad = model.model.embed_tokens.weight.grad
    assert torch.nn.functional.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0) > 0.99



def test_the_loss_skips_only_unlabelled_positions_and_equals_the_full_computation(monkeypatch):
    """A CPU speed choice that must not change what is computed: the per-token loss computes logits only where a
    label is, and equals the cross-entropy of the full logits there (0 elsewhere), gradients included."""
    rows = []
    model, x = make_model("tiny"), random_ids(2, 16)
    labels = x.clone()
    labels[0, :9], labels[1, 4:7] = -100, -100  # a prompt to skip, and a gap
    head = model.lm_head.forward
    monkeypatch.setattr(model.lm_head, "forward", lambda h: rows.append(h.shape[0]) or head(h))
    ce = model(x, labels=labels, reduction="none").loss
    logits = model(x).logits[:, :-1]
    full = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="none")
    assert rows[0] == int((labels[:, 1:] != -100).sum())  # logits for the labelled positions alone
    torch.testing.assert_close(ce, full.view(2, 15))
    grads = torch.autograd.grad(ce.sum(), [model.lm_head.weight, model.model.layers[0].mlp.up_proj.weight])
    expected = torch.autograd.grad(full.sum(), [model.lm_head.weight, model.model.layers[0].mlp.up_proj.weight])
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * e.abs().max().item())

# ---------------------------------------------------------------------------------------------------------- MoE

def _naive_moe(moe: MoEFeedForward, x):
    """Route each token on its own, in a Python loop: the reference the batched dispatch must equal."""
    out = torch.zeros_like(x)
    for i, token in enumerate(x):
        probs = F.softmax(moe.gate(token).float(), -1)
        w, idx = probs.topk(moe.top_k)
        w = w / w.sum() if moe.norm_topk_prob else w
        for weight, e in zip(w, idx):
            out[i] += weight * moe.experts[int(e)](token)
        for shared in moe.shared_experts:
            out[i] += shared(token)
    return out


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_moe_dispatch_equals_naive_per_token_reference(norm_topk_prob):
    model = make_model("tiny-moe", norm_topk_prob=norm_topk_prob)
    moe = model.model.layers[0].mlp
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        y, _ = moe(x)
        torch.testing.assert_close(y.view(-1, 64), _naive_moe(moe, x.view(-1, 64)), atol=1e-5, rtol=1e-4)


def test_moe_aux_loss_positive_and_every_expert_gets_a_gradient():
    model = make_model("tiny-moe").train()
    x = random_ids(4, 32)
    out = model(x, labels=x)
    assert out.aux_loss.item() > 0
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 6400), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ce + out.aux_loss)  # the balance loss is part of the training loss
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        if ".experts." in name or ".gate." in name:
            assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient over 128 tokens"


def test_moe_expert_with_no_tokens_still_joins_the_backward_graph():
    # DDP waits for a gradient of every parameter; an expert that routed no token must still produce one
    model = make_model("tiny-moe").train()
    moe = model.model.layers[0].mlp
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[0] += 5.0  # one direction dominates ...
    x = torch.ones(1, 3, 64)        # ... and every token points along it: experts 0 and 1 only
    y, aux = moe(x)
    (y.sum() + aux).backward()
    assert moe.experts[3].up_proj.weight.grad is not None
    assert moe.experts[3].up_proj.weight.grad.abs().sum() == 0


# ---------------------------------------------------------------------------------------------------------- RoPE / YaRN

def test_yarn_frequencies_equal_transformers_reference():
    config = MicroLMConfig.from_preset("tiny", max_position_embeddings=8192,
                                       rope_parameters=yarn_rope_parameters(factor=4.0,
                                                                            original_max_position_embeddings=2048))
    ours, ours_scale = rope_inv_freq(config)
    ref, ref_scale = ROPE_INIT_FUNCTIONS["yarn"](config)
    torch.testing.assert_close(ours, ref)
    assert ours_scale == pytest.approx(ref_scale)


def test_yarn_changes_long_positions_and_factor_1_changes_nothing():
    x = random_ids(1, 160)
    plain = make_model("tiny")
    with torch.no_grad():
        base = plain(x).logits
        for factor, should_change in [(1.0, False), (8.0, True)]:
            yarn = make_model("tiny", rope_parameters=yarn_rope_parameters(factor, original_max_position_embeddings=32))
            yarn.load_state_dict(plain.state_dict())
            diff = (yarn(x).logits - base).abs()
            if should_change:
                assert diff[:, 100:].max() > 1e-3
            else:
                assert diff.max() <= 1e-5


def test_positions_beyond_configured_length_extend_the_tables():
    model = make_model("tiny", max_position_embeddings=8)
    x = random_ids(1, 12)
    with torch.no_grad():
        full = model(x).logits
    assert model.model.rotary_emb.cos.shape[0] >= 12
    ref = make_model("tiny", max_position_embeddings=64)
    with torch.no_grad():
        torch.testing.assert_close(full, ref(x).logits)


# ---------------------------------------------------------------------------------------------------------- generate()

@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_greedy_generate_equals_manual_argmax_loop(preset):
    model = make_model(preset)
    prompt = random_ids(2, 6)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                         use_cache=True, eos_token_id=None, pad_token_id=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_sampling_with_cache_equals_sampling_without_cache(tiny_model):
    prompt = random_ids(1, 5)
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=15, do_sample=True, temperature=0.9,
                  top_k=50, top_p=0.9, repetition_penalty=1.3, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(123)
    cached = tiny_model.generate(prompt, use_cache=True, **kwargs)
    torch.manual_seed(123)
    uncached = tiny_model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] == 20


def test_repetition_penalty_changes_greedy_output():
    # a fresh tiny model repeats itself under greedy decoding; the penalty must steer it elsewhere
    model = make_model("tiny")
    prompt = random_ids(1, 4)
    kwargs = dict(max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    plain = model.generate(prompt, **kwargs)[0, 4:]
    penalised = model.generate(prompt, repetition_penalty=5.0, **kwargs)[0, 4:]
    assert len(set(penalised.tolist())) > len(set(plain.tolist()))


def test_streamer_receives_exactly_the_generated_tokens(tiny_model):
    class Collect:
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.reshape(-1))

        def end(self):
            self.ended = True

    prompt = random_ids(1, 5)
    streamer = Collect()
    out = tiny_model.generate(prompt, max_new_tokens=8, do_sample=False, streamer=streamer, eos_token_id=None,
                              pad_token_id=0)
    assert streamer.ended
    assert torch.equal(torch.cat(streamer.chunks[1:]), out[0, 5:])  # first put() is the prompt
    assert TextIteratorStreamer  # the text streamer used by eval_model.py is importable in this transformers


def test_generation_stops_at_eos(tiny_model):
    prompt = random_ids(1, 5)
    first = tiny_model.generate(prompt, max_new_tokens=1, do_sample=False)[0, -1].item()
    out = tiny_model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=first, pad_token_id=0)
    assert out.shape[1] == 6 and out[0, -1].item() == first


def test_moe_balance_loss_equals_a_hand_computation():
    """Switch-Transformer loss, coef * E * sum_e f_e * P_e, with f_e the share of the N*k routing slots that go to
    expert e and P_e its mean router probability -- counted here with plain loops over tokens."""
    cfg = MicroLMConfig.from_preset("tiny-moe", num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.1)
    torch.manual_seed(0)
    moe = MoEFeedForward(cfg)
    x = torch.randn(3, 5, cfg.hidden_size)
    _, aux = moe(x)
    tokens = x.reshape(-1, cfg.hidden_size)
    probs = [torch.softmax(moe.gate(t), -1).tolist() for t in tokens]
    E, k, N = 4, 2, len(probs)
    slots = [0] * E
    for p in probs:
        for e in sorted(range(E), key=lambda e: -p[e])[:k]:
            slots[e] += 1
    expected = 0.1 * E * sum(slots[e] / (N * k) * sum(p[e] for p in probs) / N for e in range(E))
    assert aux.item() == pytest.approx(expected, rel=1e-5)
    assert 0.1 * E * sum(slots[e] / N * sum(p[e] for p in probs) / N for e in range(E)) != pytest.approx(expected)


@pytest.mark.parametrize("moe", [False, True])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients_and_saves_less(moe):
    """Per-block recomputation (--grad_checkpoint): same loss and gradients (dropout on: the recomputed block draws the
    same mask), and the forward keeps far fewer activation bytes for the backward."""
    shape = dict(dropout=0.1, use_moe=moe, num_hidden_layers=6)  # deep enough that blocks, not logits, dominate
    plain = make_model("tiny", seed=0, **shape).train()
    ckpt = make_model("tiny", seed=0, **shape).train()
    ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = random_ids(2, 32)
    losses, saved = [], []
    for m in (plain, ckpt):
        n = [0]

        def pack(t, n=n):
            n[0] += t.numel() * t.element_size()
            return t

        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = m(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        saved.append(n[0])
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-5), name
    assert saved[1] < 0.6 * saved[0], saved


def test_a_mask_built_without_attention_mask_lands_on_the_models_device(monkeypatch):
    """A static cache with no padding and no attention_mask still needs a mask (its unwritten slots): it must be made
    on the model's device (it was made on the CPU, which broke compiled decoding on CUDA)."""
    import model.model as modeling
    from transformers import StaticCache

    mask = modeling.build_attention_mask(None, 4, 0, 16, device=torch.device("meta"))
    assert mask.device.type == "meta" and mask.shape == (4, 16)
    seen, build = [], modeling.build_attention_mask
    monkeypatch.setattr(modeling, "build_attention_mask", lambda *a, **kw: seen.append((a, kw)) or build(*a, **kw))
    model = make_model("tiny")
    model(input_ids=random_ids(1, 4), cache=StaticCache(config=model.config, max_cache_len=16), use_cache=True)
    (args, kwargs), = seen
    assert args[0] is None and [*args, *kwargs.values()][-1] == model.device  # the model's device handed down
