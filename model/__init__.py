"""The MicroLM model package: config + presets, the decoder, LoRA, and the shipped tokenizer (model/tokenizer/)."""

from pathlib import Path

from . import quiet  # noqa: F401  (first: transformers must not import torchao at start-up)
from transformers import AutoConfig, AutoModelForCausalLM

from .config import PRESETS, MicroLMConfig, to_llama_config, to_mixtral_config, yarn_rope_parameters
from .model import MicroLMForCausalLM, MicroLMModel

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"

AutoConfig.register(MicroLMConfig.model_type, MicroLMConfig, exist_ok=True)
AutoModelForCausalLM.register(MicroLMConfig, MicroLMForCausalLM, exist_ok=True)

__all__ = ["PRESETS", "TOKENIZER_DIR", "MicroLMConfig", "MicroLMForCausalLM", "MicroLMModel", "to_llama_config",
           "to_mixtral_config", "yarn_rope_parameters"]
