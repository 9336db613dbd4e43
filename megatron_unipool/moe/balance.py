"""Routing statistics of one pool: the lagged pool-level load f_bar and per-step token counts.

Shapes: L layers sharing the pool, M experts.
The pool aux loss needs f_bar over a whole optimizer step (all micro-batches, all ranks and
stages); it is therefore computed when the step ends and used during the next one, so each
layer only reads one global vector. With no completed step yet there is no f_bar and the pool
loss is zero (the documented choice for step 1).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn

from .losses import pool_load_fraction

Reduce = Callable[[torch.Tensor], torch.Tensor]


class PoolStats(nn.Module):
    def __init__(self, num_layers: int, num_experts: int, lag: str):
        super().__init__()
        self.lag = lag
        self.register_buffer("load_fraction", torch.zeros(num_experts))  # f_bar, checkpointed
        self.register_buffer("has_load_fraction", torch.zeros((), dtype=torch.bool))
        self.register_buffer("step_counts", torch.zeros(num_layers, num_experts, dtype=torch.long), persistent=False)
        self.register_buffer("micro_batch_counts", torch.zeros(num_layers, num_experts, dtype=torch.long), persistent=False)
        self.register_buffer("step_dropped", torch.zeros((), dtype=torch.long), persistent=False)
        self.recording = True
        self._f_bar_at_step_start = None  # micro_batch lag: restored when the step's update is skipped

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Ignore record() inside: activation checkpointing re-runs a forward that was already counted."""
        self.recording = False
        try:
            yield
        finally:
            self.recording = True

    @torch.no_grad()
    def record(self, layer_slot: int, routed_per_expert: torch.Tensor, dropped: int) -> None:
        if not self.recording:
            return
        self.micro_batch_counts[layer_slot] = routed_per_expert
        self.step_counts[layer_slot] += routed_per_expert
        self.step_dropped += dropped

    def f_bar(self) -> Optional[torch.Tensor]:
        return self.load_fraction if bool(self.has_load_fraction) else None

    @torch.no_grad()
    def end_micro_batch(self, reduce: Optional[Reduce] = None) -> None:
        if self.lag == "micro_batch":
            if self._f_bar_at_step_start is None:
                self._f_bar_at_step_start = (self.load_fraction.clone(), self.has_load_fraction.clone())
            self._set_f_bar(self.micro_batch_counts, reduce)

    @torch.no_grad()
    def end_step(self, reduce: Optional[Reduce] = None, update_f_bar: bool = True) -> tuple[torch.Tensor, int]:
        """Close the optimizer step: returns (this step's counts [L, M], dropped slots), summed over ranks."""
        counts = reduce(self.step_counts.clone()) if reduce else self.step_counts.clone()
        dropped = reduce(self.step_dropped.clone()) if reduce else self.step_dropped.clone()
        if self.lag == "step" and update_f_bar:
            self._set_f_bar(counts, None)
        if not update_f_bar and self._f_bar_at_step_start is not None:  # a skipped step leaves f_bar as it was
            self.load_fraction.copy_(self._f_bar_at_step_start[0])
            self.has_load_fraction.copy_(self._f_bar_at_step_start[1])
        self._f_bar_at_step_start = None
        self.step_counts.zero_()
        self.step_dropped.zero_()
        return counts, int(dropped)

    def _set_f_bar(self, counts: torch.Tensor, reduce: Optional[Reduce]) -> None:
        counts = reduce(counts.clone()) if reduce else counts
        if counts.sum() > 0:
            self.load_fraction.copy_(pool_load_fraction(counts))
            self.has_load_fraction.fill_(True)
