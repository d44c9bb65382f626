"""Export a checkpoint for stock tools: a Hugging Face folder that loads without this repository.

    python scripts/convert_model.py --stage sft --out export/microlm-sft          # dense -> LlamaForCausalLM
    python scripts/convert_model.py --stage lora --out export/microlm-medical      # base + adapter, merged
    python scripts/convert_model.py --model_path out/pretrain_moe --out export/moe # MoE -> our code via auto_map

A dense model becomes a stock `LlamaForCausalLM` folder (no remote code; same tensor names, our config translated):
    AutoModelForCausalLM.from_pretrained("export/microlm-sft")
A MoE model has no stock equivalent: its folder carries our model code and an `auto_map`, so it loads with
    AutoModelForCausalLM.from_pretrained("export/moe", trust_remote_code=True)
Both get the tokenizer (with its chat template) and a generation config.
"""

import argparse
import re
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import MicroLMForCausalLM, to_llama_config  # noqa: E402
from model.lora import from_adapter, is_adapter_dir, load_adapter, remove_lora  # noqa: E402
from trainer.checkpoint import resolve_checkpoint  # noqa: E402


def load_merged(path, adapter=None) -> MicroLMForCausalLM:
    """The checkpoint at `path` (an adapter folder brings its base), any LoRA merged into plain weights."""
    model = from_adapter(path) if is_adapter_dir(path) else MicroLMForCausalLM.from_pretrained(path)
    if adapter:
        load_adapter(model, adapter)
    remove_lora(model, merge=True)  # no-op without adapters
    return model.eval()


def generation_config(model):
    from transformers import GenerationConfig

    c = model.config
    return GenerationConfig(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                            do_sample=True, temperature=0.85, top_p=0.85, max_new_tokens=512)


def export_llama(model, tokenizer, out) -> Path:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        llama = LlamaForCausalLM(to_llama_config(model.config))
    llama.load_state_dict(model.state_dict(), strict=True, assign=True)  # same names, same shapes
    llama.generation_config = generation_config(model)
    llama.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)


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


def main(argv=None):
    from transformers import AutoTokenizer

    from model import TOKENIZER_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="sft", help="out/<stage> to export")
    parser.add_argument("--model_path", default=None, help="a checkpoint or adapter folder instead of --stage")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter to merge in before exporting")
    parser.add_argument("--out_dir", default="out")
    parser.add_argument("--out", required=True, help="the folder to write")
    args = parser.parse_args(argv)
    path = Path(args.model_path or Path(args.out_dir) / args.stage)
    if not is_adapter_dir(path):
        try:
            path = resolve_checkpoint(args.model_path or args.stage, args.out_dir)
        except FileNotFoundError as e:
            raise SystemExit(str(e)) from None
    model = load_merged(path, args.adapter)
    tok_dir = path if (path / "tokenizer_config.json").exists() else TOKENIZER_DIR
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    out = (export_remote_code if model.config.use_moe else export_llama)(model, tokenizer, args.out)
    kind = "MicroLM code via auto_map (trust_remote_code=True)" if model.config.use_moe else "stock LlamaForCausalLM"
    print(f"{path} -> {out}: {kind}")
    return out


if __name__ == "__main__":
    main()
