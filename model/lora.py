"""LoRA (arXiv 2106.09685) for MicroLM, saved and loaded in PEFT's adapter format.

`apply_lora` replaces each targeted `nn.Linear` by a `LoRALinear` that shares the same weight tensor and adds
`lora_B(lora_A(dropout(x))) * alpha / r`. The base parameter keeps its name (`...q_proj.weight`) and the adapter
lives at `...q_proj.lora_A.weight` / `...q_proj.lora_B.weight` -- PEFT's names -- so an adapter saved here loads with
`peft.PeftModel.from_pretrained` onto the Llama export, and a plain module swap (no patched `forward`) stays
friendly to torch.compile and DDP.
"""

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .families import load_for_inference

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PEFT stores adapter keys under the wrapped model's path


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # not nn.Linear.__init__: reuse the base tensors instead of allocating new ones
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        w = base.weight
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.lora_dropout = nn.Dropout(dropout)
        self.merged = False
        # PEFT's default init: A Kaiming-uniform, B zero, so a fresh adapter changes nothing
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


def _lora_modules(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def apply_lora(model: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.0,
               target_modules=DEFAULT_TARGETS) -> list[str]:
    """Wrap every nn.Linear whose last name component is in `target_modules`; returns the wrapped module names."""
    targets = set(target_modules)
    wrapped = []
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in targets and type(module) is nn.Linear:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoRALinear(module, r, alpha, dropout))
            wrapped.append(name)
    if not wrapped:
        raise ValueError(f"no nn.Linear named any of {sorted(targets)} in {type(model).__name__}")
    model.lora_config = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=sorted(targets))
    return wrapped


def mark_only_lora_trainable(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad = ".lora_A." in name or ".lora_B." in name


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merge_lora(model: nn.Module) -> None:
    for _, m in _lora_modules(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, m in _lora_modules(model):
        m.unmerge()


def remove_lora(model: nn.Module, merge: bool = True) -> None:
    """Put plain nn.Linear modules back (merged first by default): the model saves like any base checkpoint."""
    for name, m in _lora_modules(model):
        if merge:
            m.merge()
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    if hasattr(model, "lora_config"):
        del model.lora_config


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def save_adapter(model: nn.Module, out_dir, base_model_name_or_path: str | None = None,
                 base_preset: str | None = None) -> Path:
    """Write only the adapter: adapter_model.safetensors + adapter_config.json, in PEFT's format."""
    if any(m.merged for _, m in _lora_modules(model)):
        raise ValueError("adapter is merged into the base weights; unmerge_lora(model) before saving it")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    cfg = model.lora_config
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg["r"], "lora_alpha": cfg["lora_alpha"],
        "lora_dropout": cfg["lora_dropout"], "target_modules": cfg["target_modules"], "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None) or None,
        **({"base_preset": base_preset} if base_preset else {}),  # a bare .pth base: its architecture (ours; PEFT ignores it)
    }
    # each file is written aside and renamed into place: a crash mid-save leaves the previous adapter readable
    tmp = out / (ADAPTER_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp_cfg = out / (ADAPTER_CONFIG + ".tmp")
    tmp_cfg.write_text(json.dumps(peft_config, indent=2, ensure_ascii=False))
    tmp_cfg.replace(out / ADAPTER_CONFIG)
    tmp.replace(out / ADAPTER_WEIGHTS)
    return out


def load_adapter(model: nn.Module, adapter_dir) -> nn.Module:
    """Apply LoRA as described by adapter_config.json and load its tensors; every tensor must match exactly."""
    adapter_dir = Path(adapter_dir)
    cfg_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for p in (cfg_path, weights_path):
        if not p.exists():
            raise FileNotFoundError(f"no LoRA adapter file {p} (5-LoRA.py writes adapters)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if not _lora_modules(model):
        targets = cfg["target_modules"]
        apply_lora(model, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0),
                   [targets] if isinstance(targets, str) else targets)
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(weights_path)).items()}
    # PEFT may store keys with the adapter name ("lora_A.default.weight"); ours have none
    tensors = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
               for k, v in tensors.items()}
    expected = lora_state_dict(model)
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"adapter {weights_path} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"adapter tensor {k}: shape {tuple(v.shape)} != model's {tuple(expected[k].shape)}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)
    return model


def is_adapter_dir(path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).exists()


def from_adapter(adapter_dir, base=None, dtype=torch.float32) -> nn.Module:
    """Base model + adapter, ready for inference: `base` (a checkpoint) or the adapter's `base_model_name_or_path`
    (any checkpoint model/families.py reads; a bare .pth with the `base_preset` the adapter recorded)."""
    cfg = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    base = base or cfg.get("base_model_name_or_path")
    if not base or not Path(base).exists():
        raise FileNotFoundError(f"adapter {adapter_dir} needs its base model: {base!r} does not exist; pass the base "
                                f"checkpoint folder explicitly")
    model, _ = load_for_inference(base, cfg.get("base_preset"), dtype=dtype)
    return load_adapter(model, adapter_dir)
