"""Int8 weight-only quantization for decoding: every Linear's weight stored as int8 with one scale per output row.

Decoding a token reads every weight once, so on a CPU the step time is the weight bytes over the memory bandwidth:
int8 reads a quarter of fp32's bytes. The matmul is PyTorch's own int8 weight-only kernel
(aten._weight_int8pack_mm), fed bf16 activations: that is its fast path (with fp32 activations it is ~9x slower
here). torchao 0.18's Int8WeightOnlyConfig was tried first and decoded no faster than fp32 on a 2-core EPYC, so it
is not used. Activations, norms, attention and the KV cache stay in the model's dtype; only the products are int8.
"""

import torch
from torch import nn

ACT_DTYPE = torch.bfloat16


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T (+ bias), q int8 per output row, symmetric: |error| <= scale / 2 per weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        # rounded to the kernel's bf16 first, so the int8 values are chosen for the scale actually applied
        scale = (w.abs().amax(1).clamp(min=1e-12) / 127).to(ACT_DTYPE).float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(ACT_DTYPE))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(ACT_DTYPE), self.qweight,
                                               self.scale)
        y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def quantize_int8(model: nn.Module, keep=("gate",)) -> nn.Module:
    """Replaces every nn.Linear (the output head too; a tied embedding stays as it is) in place; returns the model.
    `keep`: names left in full precision -- the MoE router, whose top-k choice a rounding could flip, is tiny.
    For running only: the int8 weights get no gradients. ValueError where this torch has no int8 kernel for the
    model's device."""
    device = next(model.parameters()).device
    try:
        torch.ops.aten._weight_int8pack_mm(torch.zeros(1, 32, dtype=ACT_DTYPE, device=device),
                                           torch.zeros(8, 32, dtype=torch.int8, device=device),
                                           torch.ones(8, dtype=ACT_DTYPE, device=device))
    except (NotImplementedError, RuntimeError) as e:
        raise ValueError(f"int8 weight-only decoding needs aten._weight_int8pack_mm on {device.type}, which this "
                         f"torch build lacks ({type(e).__name__}); run without --quantize") from None

    def swap(module):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear) and name not in keep:
                setattr(module, name, Int8Linear(child).to(device))
            else:
                swap(child)

    swap(model)
    return model
