"""UniPool-lock: after a full-pool phase, give every pool expert to one layer and anneal each
router onto its own experts, ending as per-layer MoE carved out of the trained pool.

Phases, by optimizer step (moe.lock_* fields):
- the lock_window steps up to and including lock_start (1-based): the routing mass of each
  (layer, expert) is summed;
- after step lock_start: the assignment maximising the total mass routed to assigned experts, with
  every expert owned by exactly one layer and every layer owning floor(M/L) or ceil(M/L) experts
  (a mixed-integer program solved by scipy's HiGHS);
- the next lock_anneal steps: each router's logits of experts it does not own are lowered by a
  penalty rising on a half cosine to lock_penalty (the design note's cosine anneal); a NormRouter's
  on its unit-norm logits, in [-1, 1], where 1 already zeroes any score, the others' on raw logits;
- afterwards: those experts are masked out (hard lock).
The state (mass, assignment, phase) is in buffers, so checkpoints resume mid-phase.

Shapes: L layers sharing the pool, M experts.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from ..config import MoEConfig

HARD = math.inf


def solve_assignment(mass_LM: np.ndarray) -> np.ndarray:
    """Layer owning each expert, [M]: maximises sum of mass[owner(e), e] subject to each layer owning
    floor(M/L) or ceil(M/L) experts."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    layers, experts = mass_LM.shape
    low, high = experts // layers, math.ceil(experts / layers)
    one_owner = np.zeros((experts, layers * experts))  # x[l, e] flattened l-major
    share = np.zeros((layers, layers * experts))
    for e in range(experts):
        one_owner[e, e::experts] = 1
    for layer in range(layers):
        share[layer, layer * experts:(layer + 1) * experts] = 1
    result = milp(c=-np.asarray(mass_LM, dtype=np.float64).ravel(), integrality=np.ones(layers * experts),
                  bounds=Bounds(0, 1),
                  constraints=[LinearConstraint(one_owner, 1, 1), LinearConstraint(share, low, high)])
    if not result.success:
        raise RuntimeError(f"UniPool-lock assignment failed: {result.message}")
    return np.round(result.x).reshape(layers, experts).argmax(axis=0)


class PoolLock(nn.Module):
    """The lock state of one pool; each of its layers asks `logit_offset(slot)`."""

    def __init__(self, config: MoEConfig, num_layers: int, num_experts: int):
        super().__init__()
        self.config = config
        self.register_buffer("mass", torch.zeros(num_layers, num_experts, dtype=torch.float64))
        self.register_buffer("owner", torch.full((num_experts,), -1, dtype=torch.long))  # -1: not locked yet
        # what each layer adds to its router logits: 0 for its own experts (and for all before the lock),
        # -penalty (or -inf once hard) for the others; set once per step, read without a host sync
        self.register_buffer("offset", torch.zeros(num_layers, num_experts))

    def logit_offset(self, layer_slot: int) -> torch.Tensor:
        return self.offset[layer_slot]

    def usable(self, layer_slot: int) -> torch.Tensor:
        """[M] bool: the experts this layer owns; all of them before the assignment."""
        return (self.owner < 0) | (self.owner == layer_slot)

    def reachable_experts(self, layer_slot: int) -> int:
        """How many experts this layer can route to: its own once the lock is hard, else the pool
        (capacity is per reachable expert). Reads the device: called in capacity mode only."""
        return int(torch.isfinite(self.offset[layer_slot]).sum())

    @torch.no_grad()
    def end_step(self, step: int, counts_LM: torch.Tensor) -> None:
        """After optimizer step `step` (1-based) with these routing counts: advance the phases."""
        cfg = self.config
        start = cfg.lock_start_step
        if start - cfg.lock_window_steps <= step - 1 < start:
            self.mass += counts_LM.to(self.mass)
        if step < start:
            return
        unassigned, hard = torch.stack([(self.owner < 0).any(), torch.isinf(self.offset).any()]).tolist()
        if hard:  # final: an upcycled run restarts its step count with the lock in place and must not anneal again
            return
        if unassigned:  # at lock_start, or after it if that update was skipped
            self.owner.copy_(torch.from_numpy(solve_assignment(self.mass.cpu().numpy())))
        progress = (step - start + 1) / cfg.lock_anneal_steps if cfg.lock_anneal_steps else math.inf
        penalty = HARD if progress > 1 else cfg.lock_penalty * (1 - math.cos(math.pi * progress)) / 2
        layers = torch.arange(self.offset.shape[0], device=self.owner.device).unsqueeze(1)
        self.offset.copy_(torch.where(self.owner.unsqueeze(0) != layers, -penalty, 0.0))

