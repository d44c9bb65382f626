"""Starting from a released model (issue 18): random stock Llama / Qwen2 / Qwen3 / Mixtral / Qwen3-MoE folders and
MiniMind-format checkpoints (written here by their key names; nothing is downloaded) import into MicroLM with the
original's logits and greedy output, train in a stage, and export back to the stock class with the trained model's
logits; what does not map exactly is refused with the reason."""

import json

import pytest
import torch
from helpers import ROOT, assert_same_model, load_script, make_model, random_ids, save, stock_model, tiny_args
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from model import MicroLMConfig, MicroLMForCausalLM
from model.families import NotExact, load_for_inference, load_pretrained

sft = load_script("2-sft.py")
convert = load_script("scripts/convert_model.py")
DEMO = ROOT / "demo" / "data"
FAMILIES = ["llama", "qwen2", "qwen3", "mixtral", "qwen3_moe"]


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_checkpoint_imports_with_its_logits_and_greedy_output(tmp_path, tokenizer, family):
    stock = stock_model(family)
    ours = load_pretrained(save(stock, tokenizer, tmp_path / family))
    assert type(ours) is MicroLMForCausalLM
    c = ours.config
    assert (c.qk_norm, c.attention_bias, c.use_moe) == (family in ("qwen3", "qwen3_moe"), family == "qwen2",
                                                         family in ("mixtral", "qwen3_moe"))
    assert_same_model(ours, stock)


@pytest.mark.parametrize("family, overrides, reason", [
    ("llama", dict(attention_bias=True), "o_proj"),
    ("llama", dict(mlp_bias=True), "mlp_bias"),
    ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=64)), "llama3"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=0), "sliding"),
    ("qwen3_moe", dict(mlp_only_layers=[0]), "dense"),
    ("mixtral", dict(router_jitter_noise=0.1), "jitter"),
])
def test_a_mapping_that_is_not_exact_is_refused_with_the_reason(tmp_path, tokenizer, family, overrides, reason):
    folder = save(stock_model(family, **overrides), tokenizer, tmp_path / family)
    with pytest.raises(NotExact, match=reason):
        load_pretrained(folder)
    # a training stage stops with that reason instead of a traceback
    with pytest.raises(SystemExit, match=reason):
        sft.main(tiny_args(tmp_path, DEMO / "sft.jsonl", "--from", folder, "--max_steps", 1))
    # running it stays possible, exactly: the stock class itself, with a note that says so
    model, note = load_for_inference(folder)
    assert type(model).__name__ == type(stock_model(family, **overrides)).__name__ and reason in note


def test_an_unknown_family_runs_as_its_stock_class_but_never_trains(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = save(GPT2LMHeadModel(GPT2Config(vocab_size=6400, n_embd=32, n_layer=1, n_head=2)), tokenizer,
                  tmp_path / "gpt2")
    with pytest.raises(NotExact, match="gpt2.*llama, qwen2, qwen3, mixtral, qwen3_moe"):
        load_pretrained(folder)
    model, note = load_for_inference(folder)
    assert isinstance(model, GPT2LMHeadModel) and "stock transformers class" in note


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_import_train_export_to_the_stock_class(tmp_path, tokenizer, family):
    """stock folder -> `2-sft.py --from` (a few steps) -> convert_model.py -> the same stock class, holding the
    trained model: logits checked at both ends."""
    stock = stock_model(family)
    folder = save(stock, tokenizer, tmp_path / "released")
    sft.main(tiny_args(tmp_path, DEMO / "sft.jsonl", "--from", folder, "--max_steps", 3, "--batch_size", 4,
                       "--max_seq_len", 64, "--learning_rate", 1e-3))
    trained = MicroLMForCausalLM.from_pretrained(tmp_path / "out" / "sft").eval()
    with torch.no_grad():  # training moved the imported weights
        ids = random_ids(1, 16)
        assert (trained(input_ids=ids).logits - stock(input_ids=ids).logits).abs().max() > 1e-3
    out = convert.main(["--model_path", str(tmp_path / "out" / "sft"), "--out", str(tmp_path / "export")])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and "auto_map" not in config
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(exported) is type(stock)
    assert_same_model(trained, exported)
    assert json.loads((out / "tokenizer_config.json").read_text()).get("chat_template") or \
        (out / "chat_template.jinja").exists()


# ---------------------------------------------------------------------------------------------------------------------
# MiniMind's own formats: written here by MiniMind's key names (which are ours) and config fields

def _minimind_v3_folder(tmp_path, tokenizer, use_moe=False):
    """A minimind-3-style transformers folder: model_type minimind, minimind-3's config fields (defaults left out:
    the importer must know them), q_norm / k_norm tensors, tied embeddings stored under both names."""
    reference = make_model("tiny", seed=4, qk_norm=True, rms_norm_eps=1e-6, num_key_value_heads=4,
                           intermediate_size=128, **(dict(use_moe=True, num_experts=4, num_experts_per_tok=1,
                                                         n_shared_experts=0, router_aux_loss_coef=5e-4)
                                                    if use_moe else {}))
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + 1.0)
    folder = tmp_path / "minimind3"
    folder.mkdir()
    config = {"model_type": "minimind", "architectures": ["MiniMindForCausalLM"], "hidden_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
              "max_position_embeddings": 2048, "use_moe": use_moe, "flash_attn": True,
              **({"num_experts": 4, "num_experts_per_tok": 1, "moe_intermediate_size": 128} if use_moe else {})}
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.clone().contiguous() for k, v in reference.state_dict().items()}, folder / "model.safetensors")
    tokenizer.save_pretrained(folder)
    return folder, reference


@pytest.mark.parametrize("use_moe", [False, True])
def test_minimind3_folder_imports_with_minimind3s_defaults(tmp_path, tokenizer, use_moe):
    folder, reference = _minimind_v3_folder(tmp_path, tokenizer, use_moe)
    ours = load_pretrained(folder)
    c = ours.config
    # defaults the folder left out: 4 kv heads and eps 1e-6 (minimind-3's, not MiniMind2's 2 and 1e-5)
    assert (c.qk_norm, c.num_key_value_heads, c.rms_norm_eps) == (True, 4, 1e-6)
    if use_moe:
        assert (c.num_experts, c.num_experts_per_tok, c.n_shared_experts) == (4, 1, 0)
    assert_same_model(ours, reference, atol=1e-5)
    # it exports as minimind-3 does: stock Qwen3 / Qwen3-MoE
    out = convert.main(["--model_path", str(folder), "--out", str(tmp_path / "export")])
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(exported).__name__ == ("Qwen3MoeForCausalLM" if use_moe else "Qwen3ForCausalLM")
    assert_same_model(exported, reference)


def test_minimind2_folder_imports_with_minimind2s_defaults_and_moe(tmp_path, tokenizer):
    """MiniMind2-MoE's config spelling (n_routed_experts, n_shared_experts, aux_loss_alpha), .bin weights."""
    reference = make_model("tiny-moe", seed=5, rms_norm_eps=1e-5)
    folder = tmp_path / "minimind2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "minimind", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 96, "use_moe": True, "n_routed_experts": 4, "num_experts_per_tok": 2,
        "n_shared_experts": 1, "scoring_func": "softmax", "aux_loss_alpha": 0.1, "seq_aux": True,
        "norm_topk_prob": True}))
    torch.save(reference.state_dict(), folder / "pytorch_model.bin")
    tokenizer.save_pretrained(folder)
    ours = load_pretrained(folder)
    assert (ours.config.num_key_value_heads, ours.config.rms_norm_eps, ours.config.n_shared_experts) == (2, 1e-5, 1)
    assert_same_model(ours, reference, atol=1e-5)
    # MiniMind2's inference_rope_scaling is its own frequency blend, not YaRN: refused, with what to do
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "inference_rope_scaling": True}))
    with pytest.raises(NotExact, match="set it to false"):
        load_pretrained(folder)


def test_minimind_pth_needs_its_preset_and_its_tokenizer(tmp_path, tokenizer):
    """MiniMind's training output: a bare fp16 state dict (here with torch.compile's _orig_mod. prefix)."""
    reference = make_model("tiny", seed=6)
    pth = tmp_path / "full_sft_64.pth"
    torch.save({f"_orig_mod.{k}": v.half() for k, v in reference.state_dict().items()}, pth)
    with pytest.raises(ValueError, match="--preset"):
        load_pretrained(pth)
    with pytest.raises(NotExact, match="wrong shapes"):  # another architecture's tensors do not fit
        load_pretrained(pth, preset="demo")
    ours = load_pretrained(pth, preset="tiny")
    with torch.no_grad():  # the fp16-rounded tensors, exactly
        for (name, p), (_, q) in zip(ours.state_dict().items(), reference.state_dict().items()):
            assert torch.equal(p, q.half().float()), name

    # a stage takes it with --preset and --tokenizer, and says so when the tokenizer is missing
    with pytest.raises(SystemExit, match="--tokenizer"):
        sft.main(tiny_args(tmp_path, DEMO / "sft.jsonl", "--from", pth, "--max_steps", 1))
    from model import TOKENIZER_DIR

    sft.main(tiny_args(tmp_path, DEMO / "sft.jsonl", "--from", pth, "--tokenizer", TOKENIZER_DIR, "--max_steps", 1))
    assert (tmp_path / "out" / "sft" / "tokenizer_config.json").exists()

    # the chat / server loader too
    import argparse

    from inference.load import add_model_args, load

    args = add_model_args(argparse.ArgumentParser()).parse_args(
        ["--model_path", str(pth), "--preset", "tiny", "--tokenizer", str(TOKENIZER_DIR), "--device", "cpu",
         "--dtype", "float32"])
    model, tok, _ = load(args)
    assert type(model) is MicroLMForCausalLM and len(tok) == len(tokenizer)


def test_minimind3_moe_preset_has_the_published_198m_a64m(tokenizer):
    with torch.device("meta"):
        model = MicroLMForCausalLM(MicroLMConfig.from_preset("minimind3-moe"))
    counts = model.param_counts()
    assert round(counts["total"] / 1e6) == 198 and round(counts["active"] / 1e6) == 64  # "198M-A64M"


# ---------------------------------------------------------------------------------------------------------------------
# large vocabularies

def test_chunked_cross_entropy_equals_the_whole_batchs(monkeypatch):
    import model.model as modeling

    model = make_model("tiny", seed=7, vocab_size=40000).train()
    ids = torch.randint(3, 40000, (3, 40))
    labels = ids.clone()
    labels[:, :5] = -100

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, labels=labels, reduction="sum").loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    monkeypatch.setattr(modeling, "LOSS_CHUNK_ELEMENTS", 10 ** 9)  # one chunk: the plain computation
    whole, whole_grads = loss_and_grads()
    monkeypatch.setattr(modeling, "LOSS_CHUNK_ELEMENTS", 40000 * 7)  # 7 positions a chunk, a ragged last one
    chunked, chunked_grads = loss_and_grads()
    direct = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[:, :-1].flatten(0, 1),
                                               labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
    assert torch.allclose(chunked, whole, rtol=1e-5) and torch.allclose(whole, direct.detach(), rtol=1e-5)
    for a, b in zip(chunked_grads, whole_grads):  # fp32 sums in another order: ~4e-6 of the largest entry, not 0
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_lora_and_dpo_start_from_released_checkpoints(tmp_path, tokenizer):
    """The docs' recipes (docs/model.md) on stand-ins: LoRA on a MiniMind-format folder (its adapter reloads on that base) and DPO
    continuing an imported Qwen3 folder (the reference model is the imported one)."""
    from model.lora import from_adapter

    folder, reference = _minimind_v3_folder(tmp_path, tokenizer)
    lora = load_script("5-LoRA.py")
    lora.main(tiny_args(tmp_path, DEMO / "lora_medical.jsonl", "--from", folder, "--max_steps", 2, "--batch_size", 4,
                        "--max_seq_len", 64, "--learning_rate", 1e-2))
    tuned = from_adapter(tmp_path / "out" / "lora").eval()
    assert type(tuned) is MicroLMForCausalLM and tuned.config.qk_norm
    with torch.no_grad():
        ids = random_ids(1, 16)
        assert (tuned(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max() > 1e-4  # the adapter is on

    dpo = load_script("4-RLHF.py")
    summary = dpo.main(tiny_args(tmp_path, DEMO / "dpo.jsonl", "--from", save(stock_model("qwen3"), tokenizer,
                                                                             tmp_path / "qwen3"),
                                 "--max_steps", 2, "--batch_size", 2, "--max_seq_len", 64))
    assert summary["steps"] == 2
    assert json.loads((tmp_path / "out" / "dpo" / "config.json").read_text())["qk_norm"] is True
