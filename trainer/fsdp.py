"""Sharded training (--fsdp): PyTorch's FSDP2 (`fully_shard`) over every rank, one group per decoder block.

Each rank keeps 1/N of every parameter, its gradient and its optimizer state; a block's full weights exist only while
that block runs (gathered in the forward, again in the backward, then freed). The engine's loop is unchanged:
gradients are averaged over ranks like DDP's (so the loss is scaled by the world size the same way), accumulation
turns the reduce-scatter off until the window's last micro-batch, and clipping sees the global norm.

What needs the whole model is done here, without ever gathering optimizer state on one rank:
- `full_state_dict`: the weights gathered to rank 0's CPU, for the Hugging Face folder;
- `Skeleton`: the model's structure without its weights (meta tensors), made whole from such a state dict: the
  plain model a save_fn writes, and the rollout copy the RL methods sample from (a decode loop that stops when its
  own rows end cannot step in lockstep with the other ranks, and gathering every block per token would be slow);
- `save_resume` / `load_resume`: torch.distributed.checkpoint, each rank writing its own shards; the loader
  reshards, so a run resumes on a different number of ranks.
"""

import copy

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from model.model import Block


def ensure_process_group(device: torch.device):
    """A one-rank group for a plain `python` launch: FSDP needs a device mesh even for one process (which is how
    a sharded checkpoint resumes on a single GPU)."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)


def shard(model: torch.nn.Module, compute_dtype: torch.dtype, device: torch.device) -> "Skeleton":
    """Shard `model` in place, every decoder block (of the policy, and of PPO's value model) its own unit, the rest
    (embeddings, final norm, head) the root's. bf16/fp16 compute gathers and computes in that dtype while the
    shards, the gradients' reduction and the optimizer stay fp32. Returns the model's weightless skeleton."""
    ensure_process_group(device)
    skeleton = Skeleton(model)
    low = compute_dtype if compute_dtype != torch.float32 else None
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return skeleton


def is_sharded(model) -> bool:
    return isinstance(model, FSDPModule)


class Skeleton:
    """A copy of a module tree whose parameters are meta tensors (no memory); buffers (RoPE tables) stay real.
    `build(state_dict)` gives a plain model holding those weights."""

    def __init__(self, model: torch.nn.Module):
        memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                for p in model.parameters()}
        self.module = copy.deepcopy(model, memo)

    def build(self, state_dict: dict, prefix: str = "", device=None, dtype=None) -> torch.nn.Module:
        """The plain module under `prefix` (e.g. "policy." of PPO's actor-critic) with `state_dict`'s tensors."""
        module = self.module.get_submodule(prefix.rstrip(".")) if prefix else self.module
        module = copy.deepcopy(module)
        weights = under(state_dict, prefix)
        if device is not None or dtype is not None:
            weights = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                       for k, v in weights.items()}
        module.load_state_dict(weights, assign=True)  # strict: every tensor of the module, nothing else
        if hasattr(module, "tie_weights"):  # assign replaced the shared tensor: tie the head to the embedding again
            module.tie_weights()
        return module.to(device) if device is not None else module  # the buffers


def under(state_dict: dict, prefix: str) -> dict:
    """The entries of the submodule at `prefix` ("" for all), with the prefix taken off their names."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def full_state_dict(model, rank0_only: bool = True) -> dict:
    """Every parameter whole: on rank 0's CPU (rank0_only; the others get {}), or on every rank's device."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    return get_model_state_dict(model, options=options)


class RolloutCopy:
    """The plain (unsharded) policy the RL methods sample from under --fsdp, on every rank, in the compute dtype;
    refreshed from the sharded weights before each window's rollouts (a collective: every rank calls it)."""

    def __init__(self, skeleton: Skeleton, root, dtype):
        self.skeleton, self.root, self.dtype, self.models, self.fresh = skeleton, root, dtype, {}, set()

    def invalidate(self):
        """The weights changed (an optimizer step): the next call gathers them again."""
        self.fresh.clear()

    def __call__(self, policy) -> torch.nn.Module:
        prefix = next(name for name, m in self.root.named_modules() if m is policy)
        prefix = prefix + "." if prefix else ""
        if prefix in self.fresh:
            return self.models[prefix]
        self.fresh.add(prefix)
        weights = full_state_dict(self.root, rank0_only=False)
        device = next(iter(weights.values())).device
        if prefix not in self.models:
            self.models[prefix] = self.skeleton.build(weights, prefix, device, self.dtype).eval()
        else:
            self.models[prefix].load_state_dict(under(weights, prefix))
        return self.models[prefix]


def save_resume(folder, model, optimizer):
    """Every rank writes its shards of the weights and the optimizer state into folder (DCP's format)."""
    weights, optim = get_state_dict(model, optimizer)
    dcp.save({"model": weights, "optim": optim}, checkpoint_id=str(folder))


def load_resume(folder, model, optimizer):
    """Loads a `save_resume` folder into this run's shards, whatever the number of ranks that wrote it."""
    weights, optim = get_state_dict(model, optimizer)
    state = {"model": weights, "optim": optim}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
