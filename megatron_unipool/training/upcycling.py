"""Expert upcycling: grow a trained model's expert pools from E to m*E experts, top-k unchanged.

Every new expert is a copy of a source expert (its weights, its router row in every layer that
uses the pool, optionally its AdamW moments); replicas get U(-delta, delta) noise on the routers'
selection bias (the aux-loss-free `expert_bias`, our routers have no other bias) so that ties
between identical experts can break. Which experts are replicated:

- uniform: every expert m times;
- utility: each expert once, and the (m-1)*E extra copies given greedily to the experts with the
  highest utility (at most `MAX_EXTRA` extra each), utility being ||g_e||^2, or ||w_e|| * ||g_e||,
  with g_e the gradient of the LM loss w.r.t. expert e's weights averaged over a few training batches.

A dense checkpoint can also be upcycled into MoE: every expert of layer i is a copy of layer i's
dense FFN (vanilla: the dense model's function), or the pool's experts are copies of the layers' FFNs
taken in turn (UniPool: a warm start, each layer reaching every layer's FFN).

Function preservation. Replication changes two things that the upcycled model undoes:
- raw softmax gates (router=softmax, softmax_before_topk, no normalize_gates) are exp(z_e) / sum_j
  r_j exp(z_j) with r_j the copies of expert j, every gate divided by m under uniform replication:
  every expert's w_down is multiplied by m (with optimizer="copy" its moments follow its gradient,
  which is the gate's, 1/m: exp_avg / m, exp_avg_sq / m^2). With utility selection the r_j differ,
  so the factor m is only about right (on the tiny test model the loss moved by under 0.01);
- NormRouter scores depend on the logit norm and on c(M, k): its scale is rescaled (below).
Capacity is per expert, ceil(C T k / M): the capacity factor is multiplied by m, and the router
gives ties to the lower index (the source), so a source keeps its tokens and its slots (where the router
GEMM gives copied rows bit-equal logits: docs/design.md, Routing). UniPool-lock
replicas belong to their source's layer.
Exact (the source's logits): uniform replication and top-1, with any router and gating, dropless or
capacity, before or after a lock (not during NormRouter's anneal: its penalty, added to logits of
unit norm, weighs sqrt(m) more once they shrink). The selection bias, and so the noise, is read only
with bias balancing on (without it the replicas' router rows separate through the aux loss's
gradients): there the noise reorders a source and its copies, and experts whose selection scores
are within it. Softmax routers select by probability + bias; the probabilities shrink by m, so the
copied biases are divided by m (exact under uniform replication, about right under utility
selection, as w_down's factor).
Not exact: top-k > 1, where a source and its copies tie for a token's k slots (the token gets one
expert's output twice instead of its second choice): the loss moved by about +0.02 to +0.12 on the
tiny test model, depending on the router, far below a fresh model's gap (tests/test_pool_tools.py).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Literal, Optional

import torch

from ..config import Config
from ..model import ExpertPool, LanguageModel, lm_loss_sum, norm_constant
from .datasets import build_datasets

MAX_EXTRA = 3  # extra replicas one expert may receive under utility selection
Selection = Literal["uniform", "utility"]


@dataclass
class Upcycled:
    config: Config
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, dict]
    sources_per_pool: list[list[int]]  # new expert j of pool p copies old expert sources_per_pool[p][j]


def replica_sources(num_experts: int, multiplier: int, utility: Optional[torch.Tensor] = None) -> list[int]:
    """Old expert behind each of the multiplier * num_experts new ones: each source followed by its
    copies. The source wins their ties (the lower index) until they separate, and under uniform
    selection a contiguous expert-parallel shard holds whole groups, so the tokens spread over the ranks
    as before the upcycling (with the copies after all the sources, the first 1/m of the ranks got every
    token)."""
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
    return [e for e in range(num_experts) for _ in range(1 + extra[e])]


def expert_utility(model: LanguageModel, batches: list[torch.Tensor], score: str = "grad_sq",
                   progress: Optional[Callable[[int], None]] = None, eod_id: Optional[int] = None) -> list[torch.Tensor]:
    """Per pool, each expert's utility (the design note's): g_e = the gradient of the LM loss w.r.t.
    expert e's weights averaged over `batches` (token tensors [B, S+1]), then ||g_e||^2 ('grad_sq')
    or ||w_e|| * ||g_e|| ('weight_x_grad'). The model's mode and pool statistics (f_bar) are kept.
    `progress(batches done)` after each batch: on a large model each takes a while. `eod_id`: the data's
    end-of-document id, which model.document_masking needs to keep attention within documents as training did."""
    pools = list(model.expert_pools)
    grads = [{w: torch.zeros_like(getattr(pool, w), dtype=torch.float64) for w in ExpertPool.WEIGHTS} for pool in pools]
    was_training = model.training
    model.train()
    try:
        for done, tokens in enumerate(batches, start=1):
            model.zero_grad(set_to_none=True)
            logits, _ = model(tokens[:, :-1], model.documents_of(tokens[:, :-1], eod_id))
            (lm_loss_sum(logits.flatten(0, 1), tokens[:, 1:].flatten()) / tokens[:, 1:].numel()).backward()
            for grad, pool in zip(grads, pools):
                for w in ExpertPool.WEIGHTS:
                    grad[w] += getattr(pool, w).grad.double() / len(batches)
            if progress is not None:
                progress(done)
    finally:
        model.zero_grad(set_to_none=True)
        for stats in model.pool_stats:  # the scoring passes are not training steps: drop their counts, keep f_bar
            stats.end_step(update_f_bar=False)
        model.train(was_training)
    utilities = []
    for grad, pool in zip(grads, pools):
        grad_sq = sum(g.flatten(1).pow(2).sum(1) for g in grad.values())
        if score == "grad_sq":
            utilities.append(grad_sq)
        else:
            weight_sq = sum(getattr(pool, w).detach().double().flatten(1).pow(2).sum(1) for w in ExpertPool.WEIGHTS)
            utilities.append(weight_sq.sqrt() * grad_sq.sqrt())
    return utilities


def utility_batches(config: Config, count: int, batch_size: int) -> tuple[list[torch.Tensor], int]:
    """The first `count` training batches of the source run's data (the same for every call) and the data's
    end-of-document id."""
    data = build_datasets(config)
    return [data.train.batch(i * batch_size, batch_size) for i in range(count)], data.eod_id


def upcycled_config(config: Config, new_experts: int) -> Config:
    """The source config with the grown pool; capacity is per expert, ceil(C T k / M), so C grows with M
    to keep every expert's slots (the originals, which win their copies' ties (moe.router.top_k_indices),
    would drop tokens)."""
    result = copy.deepcopy(config)
    if result.moe.kind == "vanilla":
        result.moe.num_experts = new_experts
    else:
        result.moe.pool_size = new_experts
    if config.moe.capacity_factor is not None:  # in decimal (capacity() reads it so): 1.1 x 3 is 3.3, not 3.3000000000000003
        growth = Fraction(new_experts, config.moe.experts_per_pool(config.model.num_layers))
        result.moe.capacity_factor = float(Fraction(str(config.moe.capacity_factor)) * growth)
    return result


def raw_softmax_gates(config: Config) -> bool:
    """Gates are softmax probabilities over the whole pool, not renormalised: they shrink as it grows."""
    moe = config.moe
    return moe.router == "softmax" and moe.softmax_before_topk and not moe.normalize_gates


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
    # raw softmax gates: p_e = exp(z_e) / sum_j r_j exp(z_j), p_e / m under uniform replication; w_down * m undoes it
    down_scale = float(multiplier) if raw_softmax_gates(config) else 1.0
    # a softmax router selects by probability + bias: the probabilities shrink by m, so must the copied biases
    bias_scale = 1.0 / multiplier if config.moe.router == "softmax" else 1.0
    generator = torch.Generator().manual_seed(seed)
    state = dict(model_state)
    rename: dict[str, list[int]] = {}  # tensors indexed along dim 0 by expert -> sources
    rescaled: dict[str, float] = {}  # parameters multiplied by a factor (after copying) -> the factor
    for p, (layers, source) in enumerate(zip(layout, sources)):
        index = torch.tensor(source)
        is_copy = torch.tensor([j > 0 and source[j - 1] == e for j, e in enumerate(source)])
        for w in ExpertPool.WEIGHTS:
            rename[f"expert_pools.{p}.{w}"] = source
        if down_scale != 1.0:
            rescaled[f"expert_pools.{p}.w_down"] = down_scale
        if f"pool_locks.{p}.owner" in model_state:  # UniPool-lock: a replica belongs to its source's layer
            owner, offset = model_state[f"pool_locks.{p}.owner"], model_state[f"pool_locks.{p}.offset"]
            others = owner.unsqueeze(0) != torch.arange(offset.shape[0]).unsqueeze(1)  # [layers, experts] not owned
            if (owner >= 0).any() and torch.isfinite(offset[others]).any():  # a one-layer pool has no others
                raise ValueError(
                    f"pool {p}'s UniPool-lock is annealing (experts assigned, the lock not yet hard): the continued run"
                    " restarts its step count, so it would hold this penalty until moe.lock_start_step and then anneal"
                    " again from 0; upcycle before the assignment (step < moe.lock_start_step) or once the lock is hard"
                    " (after moe.lock_anneal_steps more)")
            state[f"pool_locks.{p}.owner"] = owner[index].clone()
            for buffer in ("mass", "offset"):  # [layers, experts]
                state[f"pool_locks.{p}.{buffer}"] = model_state[f"pool_locks.{p}.{buffer}"][:, index].clone()
            if (owner < 0).any():  # not assigned yet: the continued run, its step count restarted, sums a window of its own
                state[f"pool_locks.{p}.mass"].zero_()
        state[f"pool_stats.{p}.load_fraction"] = torch.zeros(len(source))  # f_bar of the old pool no longer applies
        state[f"pool_stats.{p}.has_load_fraction"] = torch.zeros((), dtype=torch.bool)
        for layer in layers:
            prefix = f"layers.{layer}.ffn.router"
            rename[f"{prefix}.weight"] = source
            bias = model_state[f"{prefix}.expert_bias"][index] * bias_scale
            bias[is_copy] += (torch.rand(int(is_copy.sum()), generator=generator) * 2 - 1) * noise
            state[f"{prefix}.expert_bias"] = bias
            if config.moe.router == "norm":
                rescaled[f"{prefix}.scale"] = _norm_router_rescale(config, new_config, source)
    for name, source in rename.items():
        state[name] = model_state[name][torch.tensor(source)].clone()
    for name, factor in rescaled.items():
        state[name] = state[name] * factor
    new_optimizer = {}
    if optimizer == "copy":
        for name, moments in optimizer_state.items():
            source = rename.get(name)
            new_optimizer[name] = {key: value[torch.tensor(source)].clone() if source is not None and value.dim() else value.clone()
                                   for key, value in moments.items()}
            # a parameter multiplied by f has 1/f of the gradient: w_down under raw softmax gates (the gate's
            # gradient, 1/m of the source's), NormRouter's scale
            if name in rescaled:
                new_optimizer[name]["exp_avg"] /= rescaled[name]
                new_optimizer[name]["exp_avg_sq"] /= rescaled[name] ** 2
    return Upcycled(new_config, state, new_optimizer, sources)


def _ways_copies_differ_from_the_ffn(target: Config) -> list[str]:
    """Why a vanilla layer whose experts all copy its dense FFN would not compute that FFN: gates that do
    not sum to 1 for every token scale its output, and capacity drops tokens."""
    moe, problems = target.moe, []
    if raw_softmax_gates(target):
        problems.append("raw softmax gates (moe.router=softmax, softmax_before_topk, no normalize_gates) scale each token's"
                        " FFN output by its top-k probability: set moe.normalize_gates=true or moe.softmax_before_topk=false")
    elif moe.router == "sigmoid" and not moe.normalize_gates:
        problems.append("sigmoid gates (no normalize_gates) scale each token's FFN output by their sum: set"
                        " moe.normalize_gates=true")
    elif moe.router == "norm":
        problems.append("NormRouter gates are scaled scores that do not sum to 1, so they would scale each token's FFN"
                        " output: upcycle into moe.router=softmax (with moe.normalize_gates=true or"
                        " moe.softmax_before_topk=false) or moe.router=sigmoid with moe.normalize_gates=true")
    if moe.capacity_factor is not None:
        problems.append("moe.capacity_factor drops the tokens over an expert's capacity (their FFN output becomes 0):"
                        " upcycle into a dropless config, and set the capacity for the continued run")
    return problems


def _norm_router_rescale(old: Config, new: Config, source: list[int]) -> float:
    """NormRouter scores are scale * c(M, k) * relu(l / ||l||). Replicating every expert m times
    multiplies ||l|| by sqrt(m) and changes c; this factor on the scale undoes both, so each
    expert keeps its score (exactly for uniform replication, approximately otherwise)."""
    old_m, new_m = old.moe.experts_per_pool(old.model.num_layers), len(source)
    return norm_constant(old.moe, old_m) / norm_constant(new.moe, new_m) * math.sqrt(new_m / old_m)


def upcycle_dense(dense_config: Config, dense_state: dict[str, torch.Tensor], target: Config) -> Upcycled:
    """Dense -> MoE: the target's experts copy the dense FFNs; routers and everything else that the
    dense model lacks keep the target's initialisation, except a shared expert's output projection,
    zero. Vanilla: layer i's experts copy layer i's FFN, exactly the dense model where every token's
    gates sum to 1 and none is dropped (other vanilla targets are refused). UniPool: pool expert j
    copies the FFN of the j-th MoE layer taken in turn, and every layer routes over all of them: a warm
    start, not the dense model's function (a pool smaller than the MoE layers leaves some FFNs out)."""
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
    moe = target.moe
    if moe.kind == "dense":
        problems.append("the target config must be vanilla or unipool")
    elif moe.kind == "vanilla":  # UniPool's layers reach other layers' FFNs: another function whatever the router
        problems += _ways_copies_differ_from_the_ffn(target)
    if problems:
        raise ValueError("the dense checkpoint cannot be upcycled into this config:\n  " + "\n  ".join(problems))
    with torch.random.fork_rng(devices=[]):  # the target's initialisation, from its seed; the caller's RNG untouched
        torch.manual_seed(target.train.seed)
        state = LanguageModel(target.model, target.moe).state_dict()
    for name, value in dense_state.items():
        if name in state and ".ffn." not in name:
            state[name] = value.clone()
    sources = []
    for p, layers in enumerate(target.moe.pool_layout(target.model.num_layers)):
        experts = state[f"expert_pools.{p}.w_gate"].shape[0]
        source = [layers[j % len(layers)] for j in range(experts)]
        for w in ExpertPool.WEIGHTS:
            state[f"expert_pools.{p}.{w}"] = torch.stack([dense_state[f"layers.{i}.ffn.{w}.weight"] for i in source])
        sources.append(source)
    for i in range(target.model.num_layers):
        if not target.moe.is_moe_layer(i):
            for w in ExpertPool.WEIGHTS:
                state[f"layers.{i}.ffn.{w}.weight"] = dense_state[f"layers.{i}.ffn.{w}.weight"].clone()
        elif moe.shared_expert_ffn_hidden_size:  # a new always-on branch: it starts at 0 and grows from the first step
            state[f"layers.{i}.ffn.shared_expert.w_down.weight"].zero_()
    return Upcycled(copy.deepcopy(target), state, {}, sources)
