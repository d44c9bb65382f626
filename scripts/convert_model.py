"""Export a checkpoint for stock tools: a Hugging Face folder that loads without this repository.

    python scripts/convert_model.py --stage sft --out export/microlm-sft          # dense -> LlamaForCausalLM
    python scripts/convert_model.py --stage lora --out export/microlm-medical      # base + adapter, merged
    python scripts/convert_model.py --model_path out/pretrain_moe --out export/moe # MoE -> our code via auto_map
    python scripts/convert_model.py --stage sft --gguf export/microlm-sft.gguf      # dense -> llama.cpp / ollama

The folder holds the stock transformers class that computes the model exactly (no remote code; same tensor names,
our config translated), loadable with AutoModelForCausalLM.from_pretrained("export/microlm-sft"):
    dense                       LlamaForCausalLM
    dense, qk_norm              Qwen3ForCausalLM      (minimind3 preset, imported Qwen3 / minimind-3)
    dense, attention_bias       Qwen2ForCausalLM      (imported Qwen2)
    MoE without shared experts  MixtralForCausalLM, or Qwen3MoeForCausalLM with qk_norm (minimind3-moe)
With shared experts (our MoE preset's default) no stock class matches: the folder carries our model code and an
`auto_map`, so it loads with
    AutoModelForCausalLM.from_pretrained("export/moe", trust_remote_code=True)
All get the tokenizer (with its chat template) and a generation config. Any checkpoint `--from` accepts can be
exported (model/families.py), e.g. a MiniMind `.pth` with `--preset` and `--tokenizer`.
`--gguf FILE` writes a GGUF of the matching llama.cpp architecture (`llama`, `qwen3` for qk_norm, `qwen2` for biases;
f16 by default; `--gguf_dtype f32`, or `q8_0` / `q4_0` quantized) with the tokenizer and chat template in its
metadata, for llama.cpp, llama-cpp-python and ollama (dense models only).
"""

import argparse
import json
import re
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer

from common.cli import HelpFormatter
from common.resolve import checkpoint_tokenizer, resolve_checkpoint
from model import TOKENIZER_DIR, MicroLMForCausalLM
from model.config import stock_family
from model.export import STOCK_EXPORTS, export_stock, generation_config
from model.families import load_pretrained
from model.lora import from_adapter, is_adapter_dir, load_adapter, remove_lora

ROOT = Path(__file__).resolve().parents[1]


def load_merged(path, adapter=None, preset=None) -> MicroLMForCausalLM:
    """The checkpoint at `path` (ours, an imported family, an adapter folder with its base; see
    model/families.py), any LoRA merged into plain weights."""
    model = from_adapter(path) if is_adapter_dir(path) else load_pretrained(path, preset)
    if adapter:
        load_adapter(model, adapter)
    remove_lora(model, merge=True)  # no-op without adapters
    return model.eval()


def export_remote_code(model, tokenizer, out) -> Path:
    """Our own classes beside the weights, wired through auto_map (for MoE, which Llama cannot hold)."""
    out = Path(out)
    model.config.auto_map = {"AutoConfig": "configuration_microlm.MicroLMConfig",
                             "AutoModelForCausalLM": "modeling_microlm.MicroLMForCausalLM"}
    model.generation_config = generation_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.copy(ROOT / "model" / "config.py", out / "configuration_microlm.py")
    code = (ROOT / "model" / "model.py").read_text(encoding="utf-8")
    code = re.sub(r"from \.config import", "from .configuration_microlm import", code)
    (out / "modeling_microlm.py").write_text(code, encoding="utf-8")
    return out


def interleave_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q_proj/k_proj rows from the half-split rotary layout (pairs i, i + d/2: HF Llama, ours) to the
    adjacent-pair layout (2i, 2i + 1) that llama.cpp's `llama` architecture rotates; attention is unchanged."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# llama.cpp picks its pre-tokenizer split by this name; each is the exact regex it implements.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def gguf_pre(tokenizer):
    """llama.cpp's name for the tokenizer's pre-tokenizer ("gpt-2", "qwen2"); anything else is refused, since
    llama.cpp would split text differently from the tokenizer the model was trained with."""
    pre = json.loads(tokenizer.backend_tokenizer.to_str())["pre_tokenizer"] or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers") or []
    if (pre.get("type") == "Sequence" and len(steps) == 2 and steps[0].get("type") == "Split"
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)):
        regex = steps[0].get("pattern", {}).get("Regex")
        if regex == QWEN2_REGEX:
            return "qwen2"
        if regex == GPT2_REGEX:
            return "gpt-2"
    raise ValueError(f"GGUF export: llama.cpp has no pre-tokenizer known to match {json.dumps(pre)[:200]}; "
                     "export a Hugging Face folder instead (--out)")


def gguf_vocab(tokenizer, vocab_size: int):
    """(tokens, token types, merges) in GGUF's gpt2 (byte-level BPE) form; ids beyond the tokenizer are padding."""
    import json

    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    added = {t.content: t for t in tokenizer.backend_tokenizer.get_added_tokens_decoder().values()}
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} embeddings")
    by_id = {i: t for t, i in vocab.items()} | {tokenizer.convert_tokens_to_ids(t): t for t in added}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL if token not in added else
                         gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, types, merges


GGUF_FILE_TYPES = {"f32": lambda g: g.LlamaFileType.ALL_F32, "f16": lambda g: g.LlamaFileType.MOSTLY_F16,
                   "q8_0": lambda g: g.LlamaFileType.MOSTLY_Q8_0, "q4_0": lambda g: g.LlamaFileType.MOSTLY_Q4_0}
QUANTS, QUANT_BLOCK = ("q8_0", "q4_0"), 32  # llama.cpp's block quantizations, 32 weights a block, via gguf.quants


def gguf_arch(config) -> str:
    """llama.cpp's architecture that computes this dense model: `qwen3` (q/k norm), `qwen2` (q/k/v biases), `llama`."""
    if config.use_moe:
        raise ValueError("GGUF export covers dense models; export a MoE model as a Hugging Face folder (--out)")
    if config.qk_norm and config.attention_bias:  # no llama.cpp architecture has both; never drop a tensor silently
        raise ValueError("no llama.cpp architecture has both q/k norm and q/k/v biases (qk_norm + attention_bias); "
                         "export this model as a Hugging Face folder (--out)")
    return "qwen3" if config.qk_norm else "qwen2" if config.attention_bias else "llama"


def export_gguf(model, tokenizer, out, dtype="f16") -> Path:
    """A GGUF of the matching llama.cpp architecture (llama / qwen2 / qwen3): weights, hyper-parameters, byte-level
    BPE tokenizer and chat template. llama.cpp rotates adjacent pairs for `llama` (q/k rows are reordered for it) and
    half-split pairs, as we do, for the Qwen architectures. Written aside and renamed: a crash leaves no half file."""
    import gguf
    import numpy as np

    c = model.config
    arch = gguf_arch(c)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    writer = gguf.GGUFWriter(tmp, arch)
    writer.add_name(out.stem)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    rope = c.rope_parameters
    if rope.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_beta_fast(rope.get("beta_fast") or 32.0)
        writer.add_rope_scaling_yarn_beta_slow(rope.get("beta_slow") or 1.0)
    writer.add_file_type(GGUF_FILE_TYPES[dtype](gguf))

    tokens, types, merges = gguf_vocab(tokenizer, c.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(gguf_pre(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)  # the chat template writes its own <|im_start|>
    writer.add_chat_template(tokenizer.chat_template)

    try:
        names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), c.num_hidden_layers)
        for name, tensor in model.state_dict().items():
            if name == "lm_head.weight" and c.tie_word_embeddings:
                continue  # llama.cpp uses token_embd for the output when there is no output.weight
            if arch == "llama" and name.endswith("q_proj.weight"):
                tensor = interleave_rope_rows(tensor, c.num_attention_heads)
            elif arch == "llama" and name.endswith("k_proj.weight"):
                tensor = interleave_rope_rows(tensor, c.num_key_value_heads)
            array = tensor.detach().float().cpu().numpy()
            gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:  # a tensor the architecture has no slot for must stop the export, not vanish
                raise ValueError(f"GGUF {arch}: no llama.cpp tensor for {name}")
            if array.ndim == 1 or dtype == "f32":  # norms stay f32, as llama.cpp expects
                writer.add_tensor(gguf_name, array)
            elif dtype in QUANTS and array.shape[-1] % QUANT_BLOCK == 0:
                qtype = getattr(gguf.GGMLQuantizationType, dtype.upper())
                writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
            else:  # f16, and rows a quantization block does not divide
                writer.add_tensor(gguf_name, array.astype(np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--stage", default="sft", help="out/<stage> to export")
    parser.add_argument("--model_path", default=None, help="a checkpoint or adapter folder instead of --stage")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter to merge in before exporting")
    parser.add_argument("--preset", default=None, help="the architecture of a bare .pth state dict (MiniMind's)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder, for a checkpoint that has none beside it")
    parser.add_argument("--out_dir", default="out")
    parser.add_argument("--out", default=None, help="the Hugging Face folder to write")
    parser.add_argument("--gguf", default=None, help="the GGUF file to write (llama.cpp, ollama)")
    parser.add_argument("--gguf_dtype", default="f16", choices=list(GGUF_FILE_TYPES),
                        help="q8_0 / q4_0: matrices quantized in llama.cpp's 32-weight blocks (norms stay f32)")
    args = parser.parse_args(argv)
    if not (args.out or args.gguf):
        parser.error("give --out (Hugging Face folder) and/or --gguf (GGUF file)")
    path = Path(args.model_path or Path(args.out_dir) / args.stage)
    if not is_adapter_dir(path):
        try:
            path = resolve_checkpoint(args.model_path or args.stage, args.out_dir)
        except FileNotFoundError as e:
            raise SystemExit(str(e)) from None
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_tokenizer(path, args.tokenizer, TOKENIZER_DIR))
    try:
        model = load_merged(path, args.adapter, args.preset)
    except ValueError as e:  # a checkpoint that does not map exactly, or a .pth without its preset
        raise SystemExit(str(e)) from None
    out = None
    if args.out:
        family = stock_family(model.config)
        if family:
            out, kind = export_stock(model, tokenizer, args.out, family), f"stock {STOCK_EXPORTS[family][0]}"
        else:  # shared experts, or q/k norm with biases: no stock class computes this model
            out, kind = export_remote_code(model, tokenizer, args.out), "MicroLM code via auto_map (trust_remote_code=True)"
        print(f"{path} -> {out}: {kind}")
    if args.gguf:
        try:
            gguf_file = export_gguf(model, tokenizer, args.gguf, args.gguf_dtype)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        print(f"{path} -> {gguf_file}: GGUF ({args.gguf_dtype}, {gguf_arch(model.config)} architecture)")
        out = out or gguf_file
    return out


if __name__ == "__main__":
    main()
