"""Keep transformers from importing torchao at start-up.

transformers imports torchao, when it is installed, as soon as `PreTrainedModel` is imported -- for its torchao
quantizer, which this project never uses. On a CPU build of torch that import alone prints torchao's failed loads of its
CUDA kernels and torch's deprecation of torchao's pytree registrations, before any line of ours. torchao is imported
where it is used: `trainer/optim.py` (--optim adamw8bit / adamw_bf16), quietly (`quiet_torchao_import`)."""

import contextlib
import logging
import sys

if "transformers.modeling_utils" not in sys.modules:  # too late once transformers' models are imported
    import transformers.utils
    from transformers.utils import import_utils

    def _torchao_not_for_transformers(*args, **kwargs) -> bool:
        return False

    import_utils.is_torchao_available = transformers.utils.is_torchao_available = _torchao_not_for_transformers


class _DropRecord(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record) -> bool:
        return self.fragment not in record.getMessage()


@contextlib.contextmanager
def quiet_torchao_import():
    """Import torchao without its two start-up notices that say nothing about our run: the CUDA kernels a CPU build of
    torch cannot load (logged at WARNING by torchao; a real failure on a GPU machine still raises where a kernel is
    used), and torch 2.13's deprecation of register_constant() on the Enums torchao 0.18 registers."""
    torchao_log, pytree_log = logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")
    enum_notice = _DropRecord("is an Enum subclass and is now natively supported")
    level = torchao_log.level
    torchao_log.setLevel(logging.ERROR if not _cuda_build() else level)
    pytree_log.addFilter(enum_notice)
    try:
        yield
    finally:
        torchao_log.setLevel(level)
        pytree_log.removeFilter(enum_notice)


def _cuda_build() -> bool:
    import torch
    return torch.version.cuda is not None
