"""The language-model loss, computed alike by the trainer, the routing probe and utility scoring."""
from __future__ import annotations

import torch

from ..kernels import cross_entropy_sum
from ..parallel.state import Group
from ..parallel.tensor_parallel import vocab_parallel_cross_entropy_sum


def lm_loss_sum(logits_NV: torch.Tensor, targets_N: torch.Tensor, backend: str = "auto",
                tp_group: Group = None) -> torch.Tensor:
    """Sum over tokens of -log softmax(logits)[target], in fp32: with the output layer split over
    `tp_group`, its vocabulary-parallel form; else `kernels.cross_entropy_sum` with `backend` (the
    trainer passes train.cross_entropy; the tools keep auto, the kernel where it runs)."""
    if tp_group is None:
        return cross_entropy_sum(logits_NV, targets_N, backend)
    return vocab_parallel_cross_entropy_sum(logits_NV, targets_N, tp_group)
