"""Balancing losses as stateless functions (formulas in shared/design/unipool.md)."""
from __future__ import annotations

import math

import torch


def load_balancing_loss(scores_TM: torch.Tensor, load_fraction_M: torch.Tensor, coeff: float) -> torch.Tensor:
    """coeff * M * sum_i f_i * P_i with P_i the mean score of expert i and f_i the (gradient-free) load.

    Per-layer Switch loss: f is this layer's share of the T*k routing slots. Pool loss: f is the
    pool-wide f_bar, and the caller divides by the number of layers sharing the pool.
    """
    num_experts = scores_TM.shape[-1]
    return coeff * num_experts * torch.sum(load_fraction_M.detach() * _token_mean(scores_TM))


def z_loss(logits_TM: torch.Tensor, coeff: float) -> torch.Tensor:
    """ST-MoE router z-loss: coeff * mean over tokens of logsumexp(logits)^2."""
    return coeff * _token_mean(torch.logsumexp(logits_TM, dim=-1).square())


def _token_mean(values_T: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens (dim 0); zero, not NaN, for a layer given no tokens."""
    return values_T.mean(dim=0) if values_T.shape[0] else values_T.sum(dim=0)


def pool_load_fraction(counts_LM: torch.Tensor, slots_L: torch.Tensor) -> torch.Tensor:
    """f_bar: per expert, each layer's fraction of its T*k routing slots, averaged over the pool's
    layers. Slots that reached no expert stay in the denominator (design note): renormalised over
    the routed ones, a layer whose NormRouter routes almost nothing would weigh as much as a full one."""
    per_layer = counts_LM.float() / slots_L.float().clamp_min(1)[:, None]
    return per_layer.mean(dim=0)


def cardinality_entropy_loss(scores_TM: torch.Tensor, target_experts: float, coeff: float) -> torch.Tensor:
    """coeff * (H(mean routing distribution) - log(target))^2: pulls a layer toward spreading its
    tokens over about `target_experts` experts (its share of the pool after the lock)."""
    if not scores_TM.shape[0]:  # no tokens: no distribution to pull
        return scores_TM.sum() * 0.0
    p = scores_TM.float().mean(0)
    p = p / p.sum().clamp(min=1e-12)
    entropy = -(p * torch.log(p.clamp(min=1e-12))).sum()
    return coeff * (entropy - math.log(target_experts)) ** 2
