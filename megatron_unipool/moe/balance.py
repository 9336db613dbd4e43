"""Routing statistics of one pool: the lagged pool-level load f_bar and per-step token counts.

Shapes: L layers sharing the pool, M experts.
The pool aux loss needs f_bar over a whole optimizer step (all micro-batches, all ranks and
stages); it is therefore computed when the step ends and used during the next one, so each
layer only reads one global vector. With no completed step yet there is no f_bar and the pool
loss is zero (the documented choice for step 1).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, NamedTuple, Optional

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
        # routing slots (tokens x k) per layer: the denominator of f, including the slots that reached no
        # expert (a NormRouter token with fewer than k positive scores)
        self.register_buffer("step_slots", torch.zeros(num_layers, dtype=torch.long), persistent=False)
        self.register_buffer("micro_batch_slots", torch.zeros(num_layers, dtype=torch.long), persistent=False)
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
    def record(self, layer_slot: int, routed_per_expert: torch.Tensor, dropped: int, slots: int) -> None:
        """One layer call: tokens routed to each expert (dropped ones included), dropped slots, and all
        its routing slots (tokens x k)."""
        if not self.recording:
            return
        # fill_, not `[layer_slot] = slots`: assigning a Python number to one element of a CUDA tensor copies it
        # from the host, which waits for the device to drain (once per MoE layer and micro-batch). In-place ops on
        # the row, not `[layer_slot] +=` (a read, an add and a write back): two launches each, not four
        self.micro_batch_counts[layer_slot].copy_(routed_per_expert)
        self.micro_batch_slots[layer_slot].fill_(slots)
        self.step_counts[layer_slot].add_(routed_per_expert)
        self.step_slots[layer_slot].add_(slots)
        self.step_dropped.add_(dropped)

    def f_bar(self) -> torch.Tensor:
        """The pool's load fraction of the previous step (or micro-batch); zeros before the first one,
        which makes the pool aux loss zero (chosen on the device: no host sync inside the forward)."""
        return self.load_fraction * self.has_load_fraction

    @torch.no_grad()
    def end_micro_batch(self, reduce: Optional[Reduce] = None) -> None:
        if self.lag == "micro_batch":
            if self._f_bar_at_step_start is None:
                self._f_bar_at_step_start = (self.load_fraction.clone(), self.has_load_fraction.clone())
            self._set_f_bar(*_summed((self.micro_batch_counts, self.micro_batch_slots), reduce))

    @torch.no_grad()
    def end_step(self, reduce: Optional[Reduce] = None, update_f_bar: bool = True) -> StepRouting:
        """Close the optimizer step: its counts, slots and dropped slots, summed over ranks."""
        counts, slots, dropped = _summed((self.step_counts, self.step_slots, self.step_dropped), reduce)
        if self.lag == "step" and update_f_bar:
            self._set_f_bar(counts, slots)
        if not update_f_bar and self._f_bar_at_step_start is not None:  # a skipped step leaves f_bar as it was
            self.load_fraction.copy_(self._f_bar_at_step_start[0])
            self.has_load_fraction.copy_(self._f_bar_at_step_start[1])
        self._f_bar_at_step_start = None
        self.step_counts.zero_()
        self.step_slots.zero_()
        self.step_dropped.zero_()
        return StepRouting(counts, slots, dropped)

    def _set_f_bar(self, counts: torch.Tensor, slots: torch.Tensor) -> None:
        """f_bar from these counts, unless the pool's layers saw no routing slot (no tokens: f_bar stays as it
        was); decided on the device, as `if slots.sum() > 0` waited for it once per micro-batch under the
        micro_batch lag."""
        any_slots = slots.sum() > 0
        self.load_fraction.copy_(torch.where(any_slots, pool_load_fraction(counts, slots), self.load_fraction))
        self.has_load_fraction.logical_or_(any_slots)


class StepRouting(NamedTuple):
    """One pool's routing over an optimizer step, summed over ranks and stages."""

    counts: torch.Tensor  # [L, M] tokens routed to each expert (dropped ones included)
    slots: torch.Tensor  # [L] routing slots (tokens x k), those that reached no expert included
    dropped: torch.Tensor  # 0-dim: read by the caller, once for all its pools


def _summed(tensors: tuple[torch.Tensor, ...], reduce: Optional[Reduce]) -> list[torch.Tensor]:
    """Copies of `tensors` (of one dtype), summed by `reduce` in one collective."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    flat = reduce(flat) if reduce else flat
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
