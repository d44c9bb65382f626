"""Devices, dtypes and process groups: plain `python` and `torchrun` launches, and rank-0 helpers."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def fast_dtype(device) -> torch.dtype:
    """The training autocast dtype: bf16 where the device computes it natively (CUDA with bf16; CPUs with AVX512-BF16
    or AMX; elsewhere bf16 matrix products are emulated, ~50x slower), fp16 on older GPUs, fp32 otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        try:
            return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
        except (AttributeError, RuntimeError):
            return torch.float32
    return torch.float32


def decode_dtype(device) -> torch.dtype:
    """The dtype models run in for inference (--dtype auto of eval_model.py, the server, the evaluations): the fast
    dtype on a GPU; fp32 on a CPU, whose greedy output is the reference. A batch-1 step there is matrix-vector
    products: in bf16 they were slower than fp32 on an AMX Xeon and faster on a memory-bound AVX2 EPYC, with the
    tokens drifting from fp32's either way (docs/benchmarks.md), so bf16 stays a choice (--dtype bfloat16)."""
    device = torch.device(device)
    return fast_dtype(device) if device.type == "cuda" else torch.float32


def pick_device(requested: str | None = None, local_rank: int = 0) -> torch.device:
    if requested and requested != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def init_distributed(requested_device: str | None = None) -> DistEnv:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain launch is a world of one. nccl on CUDA, gloo otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return DistEnv(rank, local_rank, world_size, device)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)
