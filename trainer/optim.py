"""The optimizers (--optim) and what their state costs.

- adamw: torch's AdamW (fused where the device has the kernel), fp32 weights and both moments: 16 bytes per
  parameter with the fp32 gradient.
- adamw8bit: torchao's AdamW8bit. Both moments are kept as 8-bit codes with one fp32 scale per block of 256
  (tensors of 4096+ elements whose size the block divides; smaller ones keep fp32 moments): ~10 bytes per parameter.
  The embeddings keep fp32 moments (bitsandbytes' advice): quantised, they made the loss spike on the demo text.
  torchao, not bitsandbytes: it is plain PyTorch (+ torch.compile), so the same code runs on CPU for the tests and on
  CUDA, and its states are tensor subclasses that FSDP2 shards and torch.distributed.checkpoint saves.
- adamw_bf16: the weights themselves in bf16 (no fp32 master copy), moments in bf16, and torchao's AdamW adding each
  update with stochastic rounding, so updates smaller than bf16's spacing still move the weight on average instead
  of being rounded away: 8 bytes per parameter.
"""

import torch

from model.quiet import quiet_torchao_import

OPTIMIZERS = ("adamw", "adamw8bit", "adamw_bf16")
BLOCK_8BIT = 256  # torchao's block size for the 8-bit moments
MIN_8BIT = 4096  # torchao keeps smaller tensors' moments in fp32


def build_optimizer(name: str, groups, lr: float, betas=(0.9, 0.95), fused: bool = True, fp32_state=()):
    """fp32_state: parameters whose moments adamw8bit keeps in fp32 (the embeddings)."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)
    try:
        with quiet_torchao_import():
            from torchao.optim import AdamW8bit, _AdamW
    except ImportError as e:
        raise SystemExit(f"--optim {name} needs torchao (pip install torchao): {e}") from None
    if name == "adamw8bit":
        keep = {id(p) for p in fp32_state}

        class AdamW8bitStableEmbeddings(AdamW8bit):
            """8-bit moments except the embeddings' (bitsandbytes' advice, its StableEmbedding): a row's moments
            are updated only when its token occurs, and quantising them made the loss spike in our runs."""

            def _new_buffer(self, p, signed):
                return torch.zeros_like(p) if id(p) in keep else super()._new_buffer(p, signed)

        return AdamW8bitStableEmbeddings(groups, lr=lr, betas=betas, block_size=BLOCK_8BIT)
    if name == "adamw_bf16":
        return _AdamW(groups, lr=lr, betas=betas, bf16_stochastic_round=True)
    raise ValueError(f"--optim {name}: one of {', '.join(OPTIMIZERS)}")


def weight_dtype(name: str) -> torch.dtype:
    """The dtype the trained weights are kept in."""
    return torch.bfloat16 if name == "adamw_bf16" else torch.float32


def quantized_8bit(numel: int) -> bool:
    return numel >= MIN_8BIT and numel % BLOCK_8BIT == 0


def state_bytes_per_tensor(name: str, numel: int, embedding: bool = False) -> int:
    """Bytes of optimizer state for one parameter tensor of `numel` elements (step counters not counted);
    `embedding`: adamw8bit keeps its moments in fp32."""
    if name == "adamw":
        return 8 * numel
    if name == "adamw_bf16":
        return 4 * numel
    if quantized_8bit(numel) and not embedding:  # codes + one fp32 scale per block, for each moment
        return 2 * (numel + 4 * (numel // BLOCK_8BIT))
    return 8 * numel


def _tensor_bytes(t) -> int:
    """Bytes a (possibly sharded, possibly quantized) tensor holds on this rank; shared code books not counted."""
    if hasattr(t, "to_local"):  # DTensor: this rank's shard
        t = t.to_local()
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names if n != "qmap")
    return t.numel() * t.element_size()


def measured_state_bytes(optimizer) -> int:
    """The optimizer state this rank holds, per tensor as `state_bytes_per_tensor` counts it."""
    total = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                total += _tensor_bytes(value)
    return total


def state_memory(model, optimizer) -> dict:
    """Bytes this rank holds for the trained weights, their gradients and the optimizer state (a frozen reference
    or teacher is not part of `model`)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    return {"weights": sum(_tensor_bytes(p) for p in trained),
            "gradients": sum(_tensor_bytes(p.grad) for p in trained if p.grad is not None),
            "optimizer": measured_state_bytes(optimizer)}
