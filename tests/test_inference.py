"""The inference core (inference/engine.py): its decode loop gives transformers' generate() output exactly (ours and
a stock Llama, batched with left padding, repetition penalty too), sampling filters keep what they should, streamed
text is split into reasoning / content / tool calls wherever the tokens cut it, and the tool loop stops."""

import math
import time

import pytest
import torch
from helpers import ScriptedLM, make_model

from inference import (Engine, Sampling, StreamSplitter, TextStream, convert_units, generate, left_pad, load_tools,
                       run_tool, split_reasoning)
from inference.engine import next_token, penalise, sample, warp
from inference.tools import tool_schema

ROWS = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15], [16, 17, 18, 19, 20]]


def stock_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


@pytest.mark.parametrize("which", ["ours", "llama"])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_decoding_equals_transformers_generate(which, penalty):
    model = make_model("tiny", seed=3, tie_word_embeddings=False).eval() if which == "ours" else stock_llama()
    ids, mask = left_pad(ROWS, 0)
    expected = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=16,
                              repetition_penalty=penalty, pad_token_id=0)[:, ids.size(1):]
    ours = generate(model, ids, mask, Sampling(max_new_tokens=16, repetition_penalty=penalty), pad_id=0)
    assert torch.equal(ours, expected)
    alone = [generate(model, *left_pad([r], 0), Sampling(max_new_tokens=16, repetition_penalty=penalty))[0]
             for r in ROWS]
    assert all(torch.equal(a, b) for a, b in zip(alone, ours))  # left padding changes nothing


def test_rows_stop_at_eos_and_pad_after_it():
    model = make_model("tiny", seed=3, tie_word_embeddings=False).eval()
    ids, mask = left_pad(ROWS, 0)
    free = generate(model, ids, mask, Sampling(max_new_tokens=10), pad_id=0)
    eos = int(free[1, 3])  # pretend the 4th token of row 1 is the end
    out = generate(model, ids, mask, Sampling(max_new_tokens=10), eos_id=eos, pad_id=0)
    for row, (f, o) in enumerate(zip(free.tolist(), out.tolist())):
        end = f.index(eos) + 1 if eos in f else len(f)
        assert o[:end] == f[:end] and set(o[end:]) <= {0}


def test_generate_stops_at_the_step_every_row_has_ended_whenever_the_host_looks():
    model = make_model("tiny", seed=3, tie_word_embeddings=False).eval()
    ids, mask = left_pad(ROWS, 0)
    free = generate(model, ids, mask, Sampling(max_new_tokens=24), pad_id=0)
    eos = int(free[0, 2])  # every row must reach it (or run to the end) for the loop to stop early
    ends = [f.index(eos) + 1 if eos in f else 24 for f in free.tolist()]
    for stop_check in (1, 5, 8, 64):  # the host looks every stop_check steps; steps past the end are cut
        out = generate(model, ids, mask, Sampling(max_new_tokens=24), eos_id=eos, pad_id=0, stop_check=stop_check)
        assert out.size(1) == max(ends)
        assert all(o[:e] == f[:e] for o, f, e in zip(out.tolist(), free.tolist(), ends))


def test_our_models_decode_on_the_preallocated_cache_exactly_as_a_full_forward():
    from inference.engine import KVCache, _steps

    model = make_model("tiny", seed=3, tie_word_embeddings=False).eval()
    ids, mask = left_pad(ROWS[:1], 0)
    out = generate(model, ids, mask, Sampling(max_new_tokens=6))
    with torch.no_grad():
        logits = model(torch.cat([ids, out[:, :-1]], 1)).logits[:, ids.size(1) - 1:]
    assert torch.equal(logits.argmax(-1), out)  # greedy on the cache == greedy on the whole sequence
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(type(kw["cache"])), with_kwargs=True)
    list(_steps(model, ids, mask, Sampling(max_new_tokens=3), None, 0, False, None, None, None, 1))
    assert seen == [KVCache] * 3


def test_sampling_filters_keep_only_what_they_should():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(next_token(logits, Sampling(temperature=1.0, top_k=2), generator=g).tolist()) == {1, 3}
    p = torch.softmax(logits[0], -1)  # 0.52, 0.32, ...: top_p 0.8 keeps the two largest
    assert p[1] + p[3] > 0.8 > p[1]
    assert set(next_token(logits, Sampling(temperature=1.0, top_p=0.8), generator=g).tolist()) == {1, 3}
    assert set(next_token(logits, Sampling(temperature=1.0, top_p=0.1), generator=g).tolist()) == {1}
    counts = torch.bincount(next_token(logits, Sampling(temperature=1.0), generator=g), minlength=5) / 2000
    assert torch.allclose(counts, p, atol=0.04)  # plain sampling follows the softmax


def test_each_logit_processor_equals_a_direct_computation_on_logits_of_both_signs():
    """Repetition penalty, temperature, top-k and top-p against element-by-element computations, on logits of both
    signs; and next_token draws from exactly what they leave (greedy: the penalised argmax)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=g) * 3
    seen = torch.rand(6, 40, generator=g) < 0.3
    assert (logits[seen] < 0).any() and (logits[seen] > 0).any()
    s = Sampling(temperature=0.7, repetition_penalty=1.3)
    direct = [[(x * 1.3 if x < 0 else x / 1.3) if hit else x for x, hit in zip(row, hits)]
              for row, hits in zip(logits.tolist(), seen.tolist())]
    torch.testing.assert_close(penalise(logits, s, seen), torch.tensor(direct))
    assert torch.equal(next_token(logits, Sampling(repetition_penalty=1.3), seen), torch.tensor(direct).argmax(-1))
    torch.testing.assert_close(warp(logits, s), logits / 0.7)
    for k, p in ((5, 1.0), (0, 0.6), (5, 0.6)):
        warped = warp(logits, Sampling(temperature=0.7, top_k=k, top_p=p))
        for row, out in zip((logits / 0.7).tolist(), warped.tolist()):
            order = sorted(range(40), key=lambda i: -row[i])
            keep = set(order[:k] if k else order)
            z = [math.exp(row[i] - max(row)) for i in order if i in keep]
            mass = [sum(z[:j]) / sum(z) for j in range(len(z))]  # probability of the tokens ranked above
            keep = {i for i, before in zip([i for i in order if i in keep], mass) if before < p}
            assert {i for i, v in enumerate(out) if v != float("-inf")} == keep
            assert all(abs(out[i] - row[i]) < 1e-5 for i in keep)
    s = Sampling(temperature=0.7, top_k=5, top_p=0.6, repetition_penalty=1.3)
    drawn = next_token(logits, s, seen, torch.Generator().manual_seed(1))
    expected = sample(warp(penalise(logits, s, seen), s).softmax(-1), torch.Generator().manual_seed(1))
    assert torch.equal(drawn, expected)
    nothing = Sampling(temperature=1.0, top_p=0.0)  # keeps the most likely token, never an empty distribution
    assert torch.equal(next_token(logits, nothing, generator=torch.Generator().manual_seed(2)), logits.argmax(-1))



def test_a_draw_follows_the_probabilities_and_never_lands_on_a_zero(monkeypatch):
    """The sampler (the CDF's inverse at one uniform number a row): frequencies within 4.5 standard deviations of the
    probabilities over 200,000 draws; tokens of probability 0 (cut by top-k / top-p), first, inside and last, never
    drawn, also at the extreme uniforms 0 and just below 1."""
    probs = torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3, 0.0])
    n = 200_000
    drawn = sample(probs.repeat(n, 1) * 3, torch.Generator().manual_seed(0))  # unnormalised rows work the same
    freq = torch.bincount(drawn, minlength=6).double() / n
    assert ((freq - probs.double()).abs() <= 4.5 * (probs.double() * (1 - probs.double()) / n).sqrt()).all(), freq
    for u, token in ((0.0, 1), (1 - 2 ** -24, 4)):
        monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.full(shape, u))
        assert sample(probs[None]).tolist() == [token]

def _run(events):
    """(the streamed (field, text) events, the Reply the generator returns)."""
    out = []
    while True:
        try:
            out.append(next(events))
        except StopIteration as done:
            return out, done.value


def test_a_stop_string_split_over_tokens_never_reaches_the_reply(tokenizer):
    engine = Engine(ScriptedLM(tokenizer, lambda prompt: "hello world. STOP here and more"), tokenizer)
    events, reply = _run(engine.stream_reply([{"role": "user", "content": "hi"}], stop=["STOP here"],
                                             sampling=Sampling(max_new_tokens=30)))
    assert "".join(t for f, t in events if f == "content").rstrip() == reply.content == "hello world."
    assert reply.finish_reason == "stop"


def test_a_tool_call_is_plain_content_when_no_tools_were_offered(tokenizer):
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"}}\n</tool_call>'
    engine = Engine(ScriptedLM(tokenizer, lambda prompt: call), tokenizer)
    reply = _run(engine.stream_reply([{"role": "user", "content": "1+1?"}], sampling=Sampling(max_new_tokens=40)))[1]
    assert reply.tool_calls == [] and reply.content == call and reply.finish_reason == "stop"
    offered = _run(engine.stream_reply([{"role": "user", "content": "1+1?"}], tools=[tool_schema(load_tools("calculator")["calculator"])],
                                       sampling=Sampling(max_new_tokens=40)))[1]
    assert [c["function"]["name"] for c in offered.tool_calls] == ["calculator"]


@pytest.mark.parametrize("cuts", [[], [5, 13, 27, 44, 60, 71], list(range(1, 120))])
def test_the_stream_is_split_into_reasoning_content_and_calls_wherever_tokens_cut_it(cuts):
    text = ('<think>\n要算一下。\n</think>\n\n好的。<tool_call>\n{"name": "calculator", "arguments": '
            '{"expression": "3<4"}}\n</tool_call> 然后<tool_call>\n{"name": "f"')
    pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
    splitter = StreamSplitter()
    routed = [out for piece in pieces for out in splitter.feed(piece)] + splitter.flush()
    joined = {f: "".join(t for g, t in routed if g == f) for f in ("reasoning_content", "content", "tool_call")}
    assert joined["reasoning_content"].strip() == "要算一下。"
    assert joined["tool_call"] == '\n{"name": "calculator", "arguments": {"expression": "3<4"}}\n'
    # the unclosed call is not a call: its text comes back as content
    assert joined["content"].strip() == '好的。 然后<tool_call>\n{"name": "f"'
    assert sum(f == "tool_call" for f, _ in routed) == 1
    assert split_reasoning("<think>\nx\n</think>\n<answer>\n8\n</answer>") == ("x", "8")


def test_text_stream_waits_for_characters_split_across_byte_tokens(tokenizer):
    text = "你好，世界 🌍 done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer)
    deltas = [stream.add(i) for i in ids]
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)


def test_the_tool_loop_stops_after_max_rounds(tokenizer):
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"}}\n</tool_call>'
    engine = Engine(ScriptedLM(tokenizer, lambda prompt: call), tokenizer)  # a model stuck calling
    events = []
    gen = engine.run_tools([{"role": "user", "content": "1+1?"}], load_tools("calculator"), max_rounds=2,
                           sampling=Sampling(max_new_tokens=40))
    while True:
        try:
            events.append(next(gen))
        except StopIteration as done:
            new, last = done.value
            break
    assert [m["role"] for m in new] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert [m["content"] for m in new if m["role"] == "tool"] == ["2", "2"]
    assert last.finish_reason == "tool_calls"  # still calling: the caller sees it was cut, not answered
    assert [f for f, _ in events].count("tool_result") == 2


def test_tools_time_out_convert_units_and_load_from_files(tmp_path):
    def slow(x: int) -> str:
        time.sleep(5)
        return "late"

    t = time.perf_counter()
    assert run_tool("slow", {"x": 1}, {"slow": slow}, timeout=0.2) == "error: slow timed out after 0.2 s"
    assert time.perf_counter() - t < 2
    assert run_tool("calculator", "1+1").startswith("error: bad arguments")
    assert convert_units(5, "km", "m") == "5000 m" and convert_units(100, "C", "F") == "212 F"
    assert convert_units(1, "jin", "g") == "500 g" and convert_units(32, "F", "C") == "0 C"
    assert "cannot convert" in run_tool("convert_units", {"value": 1, "from_unit": "kg", "to_unit": "m"})
    (tmp_path / "mine.py").write_text("def shout(text: str) -> str:\n    return text.upper()\n", encoding="utf-8")
    tools = load_tools(f"builtin,{tmp_path / 'mine.py'}:shout")
    assert set(tools) == {"calculator", "current_time", "convert_units", "shout"}
    assert run_tool("shout", {"text": "hi"}, tools) == "HI"
    for bad, error in [("nope", ValueError), (f"{tmp_path / 'none.py'}:f", FileNotFoundError),
                       (f"{tmp_path / 'mine.py'}:missing", ValueError)]:
        with pytest.raises(error):
            load_tools(bad)


def test_int8_weight_only_layers_compute_the_dequantized_product_and_keep_the_model_close(tmp_path):
    from argparse import Namespace

    from inference.load import load
    from inference.quant import Int8Linear, quantize_int8

    model = make_model("tiny", seed=3, tie_word_embeddings=False, use_moe=True).eval()
    ids = torch.tensor([ROWS[0]])
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "ckpt")
    linear = model.model.layers[0].self_attn.q_proj
    layer = Int8Linear(linear)
    w = linear.weight.detach()
    dequant = layer.qweight.float() * layer.scale.float()[:, None]
    assert (dequant - w).abs().le(layer.scale.float()[:, None] / 2 + 1e-6).all()  # rounding, one scale per row
    x = torch.randn(3, 5, linear.in_features)
    assert torch.allclose(layer(x), x.bfloat16().float() @ dequant.T, rtol=2e-2, atol=2e-2)

    quantize_int8(model)
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj", "lm_head"))}
    assert kinds == {"Int8Linear"}
    assert isinstance(model.model.layers[0].mlp.gate, torch.nn.Linear)  # the MoE router keeps full precision
    with torch.no_grad():
        got = model(ids).logits
    cos = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
    assert cos > 0.999 and not torch.equal(got, expected)
    assert generate(model, ids, sampling=Sampling(max_new_tokens=6)).shape == (1, 6)

    args = Namespace(stage="sft", model_path=str(tmp_path / "ckpt"), adapter=None, out_dir=str(tmp_path),
                     device="cpu", dtype="float32", quantize="int8")
    loaded, _, _ = load(args)  # what eval_model.py / the server get with --quantize int8
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, got, atol=1e-5)


def test_generated_tokens_can_be_trained_on(tiny_model):
    """The decode loop runs in inference mode; what generate() hands back must still enter autograd (RL trains on it)."""
    ids = torch.randint(3, 6400, (2, 5), generator=torch.Generator().manual_seed(0))
    out = generate(tiny_model, ids, sampling=Sampling(max_new_tokens=4))
    assert not out.is_inference()
    tiny_model.train()
    tiny_model(input_ids=out, labels=out).loss.backward()  # an inference tensor cannot be saved for backward
    assert tiny_model.model.embed_tokens.weight.grad is not None


def test_rope_tables_grown_during_a_decode_stay_ordinary_tensors():
    """Decoding past max_position_embeddings extends the RoPE tables inside inference mode; later in-place updates
    (re-initialisation, loading) must still work on them."""
    model = make_model("tiny", max_position_embeddings=16)
    generate(model, torch.randint(3, 6400, (1, 12)), sampling=Sampling(max_new_tokens=10))
    rope = model.model.rotary_emb
    assert rope.cos.shape[0] > 16 and not rope.cos.is_inference() and not rope.sin.is_inference()
    model._init_weights(rope)  # copies into the tables in place
