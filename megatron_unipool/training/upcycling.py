"""Expert upcycling: grow a trained model's expert pools from E to m*E experts, top-k unchanged.

Every new expert is a copy of a source expert (its weights, its router row in every layer that
uses the pool, optionally its AdamW moments); replicas get U(-delta, delta) noise on the routers'
selection bias (the aux-loss-free `expert_bias`, our routers have no other bias) so that ties
between identical experts can break. Which experts are replicated:

- uniform: every expert m times;
- utility: each expert once, and the (m-1)*E extra copies given greedily to the experts with the
  highest utility (at most `MAX_EXTRA` extra each), utility being ||grad_w_e L||^2, or
  ||w_e|| * ||grad_w_e L||, of the LM loss averaged over a few training batches.

A dense checkpoint can also be upcycled into MoE: every expert of layer i is a copy of layer i's
dense FFN (vanilla), or the pool's experts are copies of the layers' FFNs taken in turn (UniPool).

Function preservation: with uniform replication, no noise, top-1 and gates that do not depend on
the number of experts (renormalised softmax gates, or NormRouter with its scale rescaled as below),
the upcycled model computes exactly the source's logits. With k > 1, replicas of one expert
compete for a token's k slots and the function changes (tests/test_upcycling.py measures it).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from ..config import Config
from ..model import LanguageModel
from ..moe.router import norm_router_constant
from .datasets import build_datasets

MAX_EXTRA = 3  # extra replicas one expert may receive under utility selection
POOL_WEIGHTS = ("w_gate", "w_up", "w_down")
Selection = Literal["uniform", "utility"]


@dataclass
class Upcycled:
    config: Config
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, dict]
    sources_per_pool: list[list[int]]  # new expert j of pool p copies old expert sources_per_pool[p][j]


def replica_sources(num_experts: int, multiplier: int, utility: Optional[torch.Tensor] = None) -> list[int]:
    """Old expert behind each of the multiplier * num_experts new ones: the originals first, in order,
    then the replicas, grouped by source."""
    extra_total = (multiplier - 1) * num_experts
    if utility is None:
        extra = [multiplier - 1] * num_experts
    else:
        if multiplier - 1 > MAX_EXTRA:
            raise ValueError(f"utility selection gives at most {MAX_EXTRA} extra replicas per expert, so the"
                             f" multiplier can be at most {MAX_EXTRA + 1}, not {multiplier}")
        extra = [0] * num_experts
        remaining = extra_total
        for e in torch.argsort(utility.double(), descending=True, stable=True).tolist():
            extra[e] = min(MAX_EXTRA, remaining)
            remaining -= extra[e]
    return list(range(num_experts)) + [e for e in range(num_experts) for _ in range(extra[e])]


def expert_utility(model: LanguageModel, batches: list[torch.Tensor], score: str = "grad_sq") -> list[torch.Tensor]:
    """Per pool, each expert's utility averaged over `batches` (token tensors [B, S+1]):
    ||grad_w_e L||^2 ('grad_sq') or ||w_e|| * ||grad_w_e L|| ('weight_x_grad'), L the LM loss."""
    pools = list(model.expert_pools)
    totals = [torch.zeros(pool.num_experts, dtype=torch.float64) for pool in pools]
    model.train()
    for tokens in batches:
        model.zero_grad(set_to_none=True)
        logits, _ = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
        for total, pool in zip(totals, pools):
            grad_sq = sum(getattr(pool, w).grad.double().flatten(1).pow(2).sum(1) for w in POOL_WEIGHTS)
            if score == "grad_sq":
                total += grad_sq
            else:
                weight_sq = sum(getattr(pool, w).detach().double().flatten(1).pow(2).sum(1) for w in POOL_WEIGHTS)
                total += weight_sq.sqrt() * grad_sq.sqrt()
    model.zero_grad(set_to_none=True)
    for stats in model.pool_stats:  # the scoring passes are not training steps
        stats.end_step()
    return [total / len(batches) for total in totals]


def utility_batches(config: Config, count: int, batch_size: int) -> list[torch.Tensor]:
    """The first `count` training batches of the source run's data (the same for every call)."""
    data = build_datasets(config)
    return [data.train.batch(i * batch_size, batch_size) for i in range(count)]


def upcycled_config(config: Config, new_experts: int) -> Config:
    result = copy.deepcopy(config)
    if result.moe.kind == "vanilla":
        result.moe.num_experts = new_experts
    else:
        result.moe.pool_size = new_experts
    return result


def upcycle(config: Config, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, dict],
            multiplier: int, selection: Selection = "uniform", utility: Optional[list[torch.Tensor]] = None,
            noise: float = 1e-3, optimizer: Literal["reset", "copy"] = "reset", seed: int = 0) -> Upcycled:
    """Grow every pool of a vanilla or UniPool checkpoint `multiplier`-fold."""
    if config.moe.kind == "dense":
        raise ValueError("upcycle() grows expert pools; a dense checkpoint goes through upcycle_dense()")
    if multiplier < 2:
        raise ValueError(f"the multiplier must be at least 2, not {multiplier}")
    if selection == "utility" and utility is None:
        raise ValueError("utility selection needs the experts' utility scores (expert_utility)")
    layout = config.moe.pool_layout(config.model.num_layers)
    old_experts = config.moe.experts_per_pool(config.model.num_layers)
    sources = [replica_sources(old_experts, multiplier, utility[p] if selection == "utility" else None)
               for p in range(len(layout))]
    new_config = upcycled_config(config, multiplier * old_experts)
    generator = torch.Generator().manual_seed(seed)
    state = dict(model_state)
    rename: dict[str, list[int]] = {}  # tensors indexed along dim 0 by expert -> sources
    for p, (layers, source) in enumerate(zip(layout, sources)):
        index = torch.tensor(source)
        for w in POOL_WEIGHTS:
            rename[f"expert_pools.{p}.{w}"] = source
        state[f"pool_stats.{p}.load_fraction"] = torch.zeros(len(source))  # f_bar of the old pool no longer applies
        state[f"pool_stats.{p}.has_load_fraction"] = torch.zeros((), dtype=torch.bool)
        for layer in layers:
            prefix = f"layers.{layer}.ffn.router"
            rename[f"{prefix}.weight"] = source
            bias = model_state[f"{prefix}.expert_bias"][index].clone()
            bias[old_experts:] += (torch.rand(len(source) - old_experts, generator=generator) * 2 - 1) * noise
            state[f"{prefix}.expert_bias"] = bias
            if config.moe.router == "norm":
                state[f"{prefix}.scale"] = model_state[f"{prefix}.scale"] * _norm_router_rescale(config, new_config, source)
    for name, source in rename.items():
        state[name] = model_state[name][torch.tensor(source)].clone()
    new_optimizer = {}
    if optimizer == "copy":
        for name, moments in optimizer_state.items():
            source = rename.get(name)
            new_optimizer[name] = {key: value[torch.tensor(source)].clone() if source is not None and value.dim() else value.clone()
                                   for key, value in moments.items()}
    return Upcycled(new_config, state, new_optimizer, sources)


def _norm_router_rescale(old: Config, new: Config, source: list[int]) -> float:
    """NormRouter scores are scale * c(M, k) * relu(l / ||l||). Replicating every expert m times
    multiplies ||l|| by sqrt(m) and changes c; this factor on the scale undoes both, so each
    expert keeps its score (exactly for uniform replication, approximately otherwise)."""
    old_m, new_m, k = old.moe.experts_per_pool(old.model.num_layers), len(source), old.moe.top_k
    old_c = old.moe.norm_router_c if old.moe.norm_router_c is not None else norm_router_constant(old_m, k)
    new_c = new.moe.norm_router_c if new.moe.norm_router_c is not None else norm_router_constant(new_m, k)
    return old_c / new_c * math.sqrt(new_m / old_m)


def upcycle_dense(dense_config: Config, dense_state: dict[str, torch.Tensor], target: Config) -> Upcycled:
    """Dense -> MoE: the target's experts copy the dense FFNs; routers and everything else that the
    dense model lacks keep the target's initialisation. Vanilla: layer i's experts copy layer i's
    FFN (with renormalised gates this is exactly the dense model). UniPool: pool expert j copies
    the FFN of the j-th MoE layer taken in turn."""
    if dense_config.moe.kind != "dense":
        raise ValueError(f"upcycle_dense() needs a dense checkpoint, not moe.kind={dense_config.moe.kind!r}")
    # every model field the copied weights compute with (seq_len may differ: RoPE angles depend on the position
    # alone; init_std, kernels and recomputation do not change the function)
    fields = ["num_layers", "hidden_size", "num_heads", "num_kv_heads", "vocab_size", "tie_embeddings", "rope_base",
              "norm_eps"]
    if len(target.moe.moe_layers(target.model.num_layers)) < target.model.num_layers:
        fields.append("ffn_hidden_size")  # the target's dense layers copy the dense FFNs
    problems = [f"model.{field}: dense {getattr(dense_config.model, field)} vs target {getattr(target.model, field)}"
                for field in fields if getattr(dense_config.model, field) != getattr(target.model, field)]
    width = target.moe.expert_width(target.model.ffn_hidden_size)
    if width != dense_config.model.ffn_hidden_size:
        problems.append(f"expert width {width} must equal the dense FFN width {dense_config.model.ffn_hidden_size}")
    if target.moe.kind == "dense":
        problems.append("the target config must be vanilla or unipool")
    if problems:
        raise ValueError("the dense checkpoint cannot be upcycled into this config:\n  " + "\n  ".join(problems))
    torch.manual_seed(target.train.seed)
    state = LanguageModel(target.model, target.moe).state_dict()
    for name, value in dense_state.items():
        if name in state and ".ffn." not in name:
            state[name] = value.clone()
    sources = []
    for p, layers in enumerate(target.moe.pool_layout(target.model.num_layers)):
        experts = state[f"expert_pools.{p}.w_gate"].shape[0]
        source = [layers[j % len(layers)] for j in range(experts)]
        for w in POOL_WEIGHTS:
            state[f"expert_pools.{p}.{w}"] = torch.stack([dense_state[f"layers.{i}.ffn.{w}.weight"] for i in source])
        sources.append(source)
    for i in range(target.model.num_layers):
        if not target.moe.is_moe_layer(i):
            for w in POOL_WEIGHTS:
                state[f"layers.{i}.ffn.{w}.weight"] = dense_state[f"layers.{i}.ffn.{w}.weight"].clone()
    return Upcycled(copy.deepcopy(target), state, {}, sources)
