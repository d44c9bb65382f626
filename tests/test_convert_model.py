"""scripts/convert_model.py: a dense export loads as stock LlamaForCausalLM (no remote code) with our logits and
generation; a LoRA stage exports merged; a MoE export loads through auto_map with trust_remote_code."""

import json
import os
import subprocess
import sys

import torch
from conftest import load_script, make_model, random_ids, save_random_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from model.lora import from_adapter

convert = load_script("scripts/convert_model.py")


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_dense_export_is_stock_llama_with_our_logits_and_chat_template(tmp_path, tokenizer):
    ours = make_model("tiny", seed=2)
    _save(ours, tokenizer, tmp_path / "out" / "sft")
    out = convert.main(["--out_dir", str(tmp_path / "out"), "--stage", "sft", "--out", str(tmp_path / "hf")])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg
    llama = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(llama) is LlamaForCausalLM
    x = random_ids(2, 16)
    with torch.no_grad():
        assert (llama(x).logits - ours(x).logits).abs().max() <= 1e-4
    exported_tok = AutoTokenizer.from_pretrained(out)
    assert exported_tok.chat_template == tokenizer.chat_template
    assert llama.generation_config.eos_token_id == tokenizer.eos_token_id
    prompt = torch.tensor([[1, 300, 400, 500]])
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(llama.generate(prompt, **greedy), ours.generate(prompt, **greedy))


def test_lora_stage_exports_base_plus_adapter_merged(tmp_path, tokenizer):
    base = _save(make_model("tiny", seed=2), tokenizer, tmp_path / "out" / "sft")
    save_random_adapter(tmp_path / "out" / "lora", base, seed=2)
    out = convert.main(["--out_dir", str(tmp_path / "out"), "--stage", "lora", "--out", str(tmp_path / "hf")])
    llama = LlamaForCausalLM.from_pretrained(out).eval()
    x = random_ids(1, 12)
    with torch.no_grad():
        want = from_adapter(tmp_path / "out" / "lora").eval()(x).logits
        assert (llama(x).logits - want).abs().max() <= 1e-4
        assert (llama(x).logits - make_model("tiny", seed=2)(x).logits).abs().max() > 1e-3  # the adapter is in


def test_moe_export_loads_through_auto_map_with_remote_code(tmp_path, tokenizer):
    ours = make_model("tiny-moe", seed=2)
    _save(ours, tokenizer, tmp_path / "moe")
    out = convert.main(["--model_path", str(tmp_path / "moe"), "--out", str(tmp_path / "hf")])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_microlm.MicroLMForCausalLM"
    assert "from .config import" not in (out / "modeling_microlm.py").read_text()
    # in a fresh process, outside this repository: only the exported code can build the model
    x = random_ids(2, 10)
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys, torch\n"
              "from transformers import AutoModelForCausalLM\n"
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
              "assert type(m).__module__.endswith('modeling_microlm'), type(m).__module__\n"
              "with torch.no_grad():\n"
              "    torch.save(m(torch.load(sys.argv[2], weights_only=True)).logits, sys.argv[3])\n")
    subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"})
    with torch.no_grad():
        assert (torch.load(tmp_path / "y.pt", weights_only=True) - ours(x).logits).abs().max() <= 1e-5
