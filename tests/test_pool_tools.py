"""The pool tools of tools/: expert upcycling (exact function preservation where it must hold, the
measured gap where it cannot, utility-based replicas, optimizer-state copies, dense -> MoE, tool +
launcher round trip), the routing probe and the utilisation analysis."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_unipool.config import config_from_dict, config_to_dict, load_config
from megatron_unipool.model import LanguageModel, param_budget
from megatron_unipool.training import Trainer, build_datasets, load_checkpoint, resolve_checkpoint
from megatron_unipool.training.upcycling import (MAX_EXTRA, expert_utility, replica_sources, upcycle, upcycle_dense,
                                                 utility_batches)
from script_modules import load_script

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=128",
         "model.seq_len=32", "train.global_batch=8", "train.micro_batch=4", "train.warmup_steps=2",
         "train.eval_batches=2", "train.eval_interval=0", "logging.tensorboard=false", "checkpoint.save_interval=0",
         "checkpoint.resume=false", "train.lr=0.003"]

pytestmark = pytest.mark.usefixtures("single_thread")


def small_config(data_cache, kind="unipool", *overrides):
    return load_config(REPO / f"configs/tiny_{kind}_cpu.json", SMALL + [f"data.cache_dir={data_cache}", *overrides])


def model_from(config, state):
    model = LanguageModel(config.model, config.moe)
    model.load_state_dict(state)
    return model.eval()


def tool_module(name: str):
    """tools/<name>.py as a module: its main and helpers in this process, to stub or spy on them."""
    return load_script(REPO / "tools" / f"{name}.py")


def tokens(config, count=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, config.model.seq_len + 1), generator=generator)


def lm_loss(model, batch):
    with torch.no_grad():
        logits, _ = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    """Short runs whose checkpoints the tests upcycle: {name: (config, payload)}."""
    runs = {
        "softmax_top1": ("unipool", ["moe.router=softmax", "moe.normalize_gates=true", "moe.top_k=1", "moe.aux_loss=pool"]),
        "norm_top1": ("unipool", ["moe.router=norm", "moe.top_k=1"]),
        # the aux loss leaves most NormRouter slots past layer 0 unrouted after 30 steps (docs/design.md): without it
        # every layer routes, so an upcycling test covers them all
        "norm_routed_top1": ("unipool", ["moe.router=norm", "moe.top_k=1", "moe.aux_loss=none"]),
        "vanilla_top1": ("vanilla", ["moe.router=softmax", "moe.softmax_before_topk=false", "moe.top_k=1"]),
        "softmax_top2": ("unipool", ["moe.router=softmax", "moe.top_k=2"]),
        # raw softmax gates (configs/vanilla_*.json): probabilities over the pool, not renormalised
        "raw_softmax_top1": ("vanilla", ["moe.router=softmax", "moe.softmax_before_topk=true",
                                         "moe.normalize_gates=false", "moe.top_k=1"]),
        # hard-locked by step 30: every expert owned by one layer, the others masked
        "lock_top1": ("unipool", ["moe.router=norm", "moe.top_k=1", "moe.lock_start_step=10",
                                  "moe.lock_window_steps=5", "moe.lock_anneal_steps=5"]),
        "capacity_top1": ("unipool", ["moe.router=softmax", "moe.normalize_gates=true", "moe.top_k=1",
                                      "moe.capacity_factor=1.25"]),
        # selection by probability + the balancing bias, which 30 steps move far enough to reorder experts
        "softmax_bias_top1": ("unipool", ["moe.router=softmax", "moe.normalize_gates=true", "moe.top_k=1",
                                          "moe.bias_balancing=true"]),
    }
    out = {}
    for name, (kind, overrides) in runs.items():
        config = small_config(data_cache, kind, "train.max_steps=30", *overrides)
        run_dir = tmp_path_factory.mktemp(name)
        Trainer(config, run_dir, device=torch.device("cpu")).train()
        out[name] = (config, load_checkpoint(resolve_checkpoint(run_dir)), run_dir)
    return out


@pytest.mark.parametrize("name", ["softmax_top1", "norm_top1", "norm_routed_top1", "vanilla_top1", "raw_softmax_top1",
                                  "softmax_bias_top1"])
def test_uniform_top1_upcycling_keeps_the_function(trained, name):
    config, payload, run_dir = trained[name]
    if name == "norm_routed_top1":  # the routing this test must cover: every layer's slots reach experts
        from megatron_unipool.training.probe import load_routed_model, record_routing, routing_batches

        _, routing = record_routing(load_routed_model(run_dir, "")[2], *routing_batches(config, 1))
        assert all((routing[layer] < 0).double().mean() < 0.05 for layer in range(config.model.num_layers))
    result = upcycle(config, payload["model"], payload["optimizer"], multiplier=2, noise=0.0)
    assert result.config.moe.experts_per_pool(config.model.num_layers) == 2 * config.moe.experts_per_pool(
        config.model.num_layers)
    batch = tokens(config)
    source, grown = model_from(config, payload["model"]), model_from(result.config, result.model_state)
    with torch.no_grad():
        expected, actual = source(batch[:, :-1])[0], grown(batch[:, :-1])[0]
    # fp32 rounding: NormRouter's norm over twice the experts sums in another order. In norm_top1 the last hidden
    # states agreed to 6e-7, which the final norm and output layer took to 1.2e-5 on logits of about 3
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("multiplier", [2, 3])
def test_raw_softmax_gates_are_compensated(trained, multiplier):
    """Raw softmax gates exp(z_e) / sum_j r_j exp(z_j) are divided by m: w_down * m restores the
    source's logits (with the default noise too), and the copied moments follow w_down's gradient."""
    config, payload, _ = trained["raw_softmax_top1"]
    result = upcycle(config, payload["model"], payload["optimizer"], multiplier, optimizer="copy")
    batch = tokens(config)
    source, grown = model_from(config, payload["model"]), model_from(result.config, result.model_state)
    with torch.no_grad():
        expected, actual = source(batch[:, :-1])[0], grown(batch[:, :-1])[0]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # the gradient w.r.t. w_down' = m w_down is the gate's, 1/m of the source's (summed over the copies, which
    # share the source's tokens as top-k breaks their ties): the moments must scale alike
    layer = 0
    name, sources = f"expert_pools.{layer}.w_down", torch.tensor(result.sources_per_pool[layer])
    grads = []
    for model in (source, grown):
        logits, _ = model(batch[:, :-1])
        grads.append(torch.autograd.grad(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()),
                                         model.expert_pools[layer].w_down)[0])
    per_source = torch.zeros_like(grads[0]).index_add_(0, sources, grads[1])
    torch.testing.assert_close(per_source, grads[0] / multiplier, rtol=1e-4, atol=1e-8)
    moments, old = result.optimizer_state[name], payload["optimizer"][name]
    # relative only: second moments are ~1e-10, far below assert_close's default absolute tolerance
    torch.testing.assert_close(moments["exp_avg"], old["exp_avg"][sources] / multiplier, rtol=1e-6, atol=0)
    torch.testing.assert_close(moments["exp_avg_sq"], old["exp_avg_sq"][sources] / multiplier ** 2, rtol=1e-6, atol=0)


def test_upcycling_noise_reaches_only_the_copies(trained):
    """Noise breaks the ties between a source and its copies: the original experts keep their
    balancing biases exactly, and each copy gets its source's bias plus noise within +-noise, of
    either sign. The pool's f_bar starts over."""
    config, payload, _ = trained["softmax_top1"]
    result = upcycle(config, payload["model"], payload["optimizer"], multiplier=2, noise=1e-2)
    old = config.moe.experts_per_pool(config.model.num_layers)
    sources = torch.tensor(result.sources_per_pool[0])
    first = torch.tensor([j == result.sources_per_pool[0].index(e) for j, e in enumerate(sources.tolist())])
    assert torch.equal(sources[first], torch.arange(old))  # each source once, before its copies
    for layer in config.moe.moe_layers(config.model.num_layers):
        name = f"layers.{layer}.ffn.router.expert_bias"
        before, after = payload["model"][name], result.model_state[name]
        assert torch.equal(after[first], before)
        shift = after[~first] - before[sources[~first]]
        assert (shift != 0).all() and (shift.abs() <= 1e-2).all()
        assert (shift > 0).any() and (shift < 0).any()  # symmetric: copies are not favoured over their sources
    # the old pool's f_bar does not describe the new one: the pool aux loss waits for a step of its own
    assert not result.model_state["pool_stats.0.has_load_fraction"]
    assert not result.model_state["pool_stats.0.load_fraction"].any()


def test_copies_sit_beside_their_source_so_expert_parallel_shards_keep_their_load(trained):
    """Uniform top-1 x2: each source keeps its tokens (its copies tie and lose), and contiguous shards of
    the grown pool (expert parallelism's) get the tokens the same shards of the source pool got. With the
    copies after all the sources, the first half of the pool got every token and the second none."""
    config, payload, _ = trained["softmax_top1"]
    result = upcycle(config, payload["model"], payload["optimizer"], multiplier=2, noise=0.0)
    batch = tokens(config, count=8)
    per_expert = []
    for cfg, state in ((config, payload["model"]), (result.config, result.model_state)):
        model = model_from(cfg, state).train()  # training mode records the routing counts
        with torch.no_grad():
            model(batch[:, :-1])
        per_expert.append(model.pool_stats[0].step_counts.sum(0))
    source_load, grown_load = per_expert
    assert (source_load > 0).sum() > 2  # the source spreads its tokens
    for ep in (2, 4):
        torch.testing.assert_close(grown_load.view(ep, -1).sum(1), source_load.view(ep, -1).sum(1), rtol=0, atol=0)


def test_upcycling_refuses_a_lock_in_its_anneal(trained):
    """Assigned but not yet hard: the continued run, its step count restarted, would hold the penalty
    until lock_start_step and then anneal again from 0."""
    config, payload, _ = trained["lock_top1"]
    offset = payload["model"]["pool_locks.0.offset"]
    annealing = dict(payload["model"], **{"pool_locks.0.offset": torch.where(torch.isinf(offset), -2.0, offset)})
    with pytest.raises(ValueError, match="pool 0's UniPool-lock is annealing"):
        upcycle(config, annealing, payload["optimizer"], multiplier=2)


def test_a_lock_over_one_layer_pools_is_final_once_assigned(data_cache):
    """moe.layers_per_pool=1: each layer owns its whole pool, so no offset ever turns -inf; the lock is
    not annealing anything and the pools upcycle."""
    config = small_config(data_cache, "unipool", "moe.layers_per_pool=1", "moe.lock_start_step=2",
                          "moe.lock_window_steps=1")
    state = LanguageModel(config.model, config.moe).state_dict()
    for p in range(len(config.moe.pool_layout(config.model.num_layers))):
        state[f"pool_locks.{p}.owner"] = torch.zeros_like(state[f"pool_locks.{p}.owner"])
    result = upcycle(config, state, {}, multiplier=2)
    assert (result.model_state["pool_locks.0.owner"] == 0).all()


def test_norm_router_scale_moments_follow_its_gradient(trained):
    """--optimizer copy: NormRouter's scale is multiplied by f, so its gradient is divided by f (measured
    here on the upcycled model, which computes the source's function); its moments must follow."""
    config, payload, _ = trained["norm_top1"]
    result = upcycle(config, payload["model"], payload["optimizer"], multiplier=2, noise=0.0, optimizer="copy")
    batch = tokens(config)
    layer = config.moe.moe_layers(config.model.num_layers)[0]
    gradients = []
    for cfg, state in ((config, payload["model"]), (result.config, result.model_state)):
        model = model_from(cfg, state)
        logits, _ = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        gradients.append(torch.autograd.grad(loss, model.layers[layer].ffn.router.scale)[0])
    ratio = float(gradients[1] / gradients[0])
    assert abs(ratio - 1) > 0.05  # the scale was rescaled: a copied moment would be off by this much
    name = f"layers.{layer}.ffn.router.scale"
    old, new = payload["optimizer"][name], result.optimizer_state[name]
    torch.testing.assert_close(new["exp_avg"], old["exp_avg"] * ratio, rtol=1e-4, atol=0)
    torch.testing.assert_close(new["exp_avg_sq"], old["exp_avg_sq"] * ratio ** 2, rtol=1e-4, atol=0)


def test_locked_pool_upcycles_and_keeps_the_function(trained):
    """UniPool-lock buffers: each replica belongs to its source's layer, with its source's mass and offsets."""
    config, payload, _ = trained["lock_top1"]
    owner = payload["model"]["pool_locks.0.owner"]
    assert (owner >= 0).all() and torch.isinf(payload["model"]["pool_locks.0.offset"]).any()  # hard-locked
    result = upcycle(config, payload["model"], payload["optimizer"], multiplier=2)
    sources = torch.tensor(result.sources_per_pool[0])
    assert torch.equal(result.model_state["pool_locks.0.owner"], owner[sources])
    for buffer in ("mass", "offset"):
        assert torch.equal(result.model_state[f"pool_locks.0.{buffer}"], payload["model"][f"pool_locks.0.{buffer}"][:, sources])
    grown = model_from(result.config, result.model_state)  # loads: every buffer has the grown pool's size
    batch = tokens(config)
    with torch.no_grad():
        expected, actual = model_from(config, payload["model"])(batch[:, :-1])[0], grown(batch[:, :-1])[0]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # a source not yet assigned: the continued run (its step count restarted) sums a routing window of its own
    unassigned = dict(payload["model"], **{"pool_locks.0.owner": torch.full_like(owner, -1),
                                           "pool_locks.0.offset": torch.zeros_like(payload["model"]["pool_locks.0.offset"])})
    early = upcycle(config, unassigned, payload["optimizer"], multiplier=2)
    assert payload["model"]["pool_locks.0.mass"].any() and not early.model_state["pool_locks.0.mass"].any()


def test_capacity_upcycling_keeps_each_experts_slots(trained):
    """Capacity is ceil(C T k / M) per expert: C grows with M, so the originals (which take every token
    their tied copies would) drop exactly what they dropped before."""
    config, payload, _ = trained["capacity_top1"]
    result = upcycle(config, payload["model"], payload["optimizer"], multiplier=2, noise=0.0)
    assert result.config.moe.capacity_factor == 2.5
    assert upcycle(config, payload["model"], {}, 3).config.moe.capacity_factor == 3.75
    batch = tokens(config, count=8)
    dropped, outputs = [], []
    for cfg, state in ((config, payload["model"]), (result.config, result.model_state)):
        model = model_from(cfg, state).train()  # training mode records the dispatch statistics
        with torch.no_grad():
            outputs.append(model(batch[:, :-1])[0])
        dropped.append(int(model.pool_stats[0].step_dropped))
    assert dropped[0] > 0 and dropped[1] == dropped[0]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router", ["softmax", "sigmoid", "norm"])
def test_capacity_upcycling_of_small_pools_is_exact(data_cache, router):
    """4 -> 8 experts per layer, capacity 0.5: pools this small are where torch.topk handed part of
    the source's ties to its copies (each with the source's slots: 219 -> 173 dropped slots seen);
    with ties to the lower index the copies get none and the function is the source's."""
    config = small_config(data_cache, "vanilla", f"moe.router={router}", "moe.num_experts=4",
                          "moe.capacity_factor=0.5", *(["moe.normalize_gates=true"] if router == "sigmoid" else []))
    torch.manual_seed(1)
    state = LanguageModel(config.model, config.moe).state_dict()
    result = upcycle(config, state, {}, multiplier=2)
    batch = tokens(config, count=8)
    dropped, outputs = [], []
    for cfg, weights in ((config, state), (result.config, result.model_state)):
        model = model_from(cfg, weights).train()  # training mode records the dispatch statistics
        with torch.no_grad():
            outputs.append(model(batch[:, :-1])[0])
        dropped.append(sum(int(stats.step_dropped) for stats in model.pool_stats))
    assert dropped[0] > 0 and dropped[1] == dropped[0]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


def test_top2_upcycling_gap_is_far_below_a_fresh_model(trained, data_cache):
    """k = 2: replicas of one expert compete for a token's two slots, so the function changes."""
    config, payload, _ = trained["softmax_top2"]
    result = upcycle(config, payload["model"], payload["optimizer"], multiplier=2)
    batch = build_datasets(config).valid.batch(0, 32)
    before = lm_loss(model_from(config, payload["model"]), batch)
    after = lm_loss(model_from(result.config, result.model_state), batch)
    torch.manual_seed(0)
    fresh = lm_loss(LanguageModel(result.config.model, result.config.moe).eval(), batch)
    print(f"top-2 upcycling x2: loss {before:.4f} -> {after:.4f} (fresh model {fresh:.4f})")
    assert after != pytest.approx(before, abs=1e-6)
    assert after - before < 0.1 * (fresh - before)


def test_utility_allocation_gives_extra_copies_to_the_top_experts():
    utility = torch.tensor([0.1, 5.0, 3.0, 0.2, 4.0])
    sources = replica_sources(5, multiplier=2, utility=utility)
    assert sources == [0, 1, 1, 1, 1, 2, 3, 4, 4, 4]  # 5 extra: 3 to the best, the remaining 2 to the second
    # each source followed by its copies: contiguous expert-parallel shards hold whole groups
    assert replica_sources(3, multiplier=3) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    ranked = replica_sources(4, multiplier=3, utility=torch.tensor([4.0, 3.0, 2.0, 1.0]))  # 8 extra, at most 3 each
    assert [ranked.count(e) for e in range(4)] == [1 + 3, 1 + 3, 1 + 2, 1]
    with pytest.raises(ValueError, match="multiplier can be at most 4"):
        replica_sources(4, multiplier=5, utility=torch.ones(4))


@pytest.mark.parametrize("name, score", [("softmax_top2", "grad_sq"), ("softmax_top2", "weight_x_grad"),
                                         ("vanilla_top1", "grad_sq")])
def test_expert_utility_matches_the_gradient_it_names(trained, name, score):
    """The design note: g_e = the gradient averaged over the batches, then ||g_e||^2 or ||w_e|| * ||g_e||
    (not the mean of per-batch squared norms, which also counts the batches' disagreement); per pool, so
    each of a vanilla model's layers is scored by its own experts' gradients."""
    config, payload, _ = trained[name]
    model = model_from(config, payload["model"])
    batches, _ = utility_batches(config, 3, 2)
    utilities = expert_utility(model, batches, score)
    assert len(utilities) == len(model.expert_pools)
    weights = [w for pool in model.expert_pools for w in (pool.w_gate, pool.w_up, pool.w_down)]
    mean_grads = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    for batch in batches:
        logits, _ = model(batch[:, :-1])
        grads = torch.autograd.grad(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()), weights)
        for total, g in zip(mean_grads, grads):
            total += g.double() / len(batches)
    for p, (pool, utility) in enumerate(zip(model.expert_pools, utilities)):
        pool_weights, pool_grads = weights[3 * p:3 * p + 3], mean_grads[3 * p:3 * p + 3]
        g_norm = torch.stack([torch.linalg.vector_norm(torch.cat([g[e].flatten() for g in pool_grads]))
                              for e in range(pool.num_experts)])
        w_norm = torch.stack([torch.linalg.vector_norm(torch.cat([w[e].detach().double().flatten()
                                                                  for w in pool_weights]))
                              for e in range(pool.num_experts)])
        expected = g_norm ** 2 if score == "grad_sq" else w_norm * g_norm
        torch.testing.assert_close(utility, expected, rtol=1e-6, atol=0)
        assert (utility > 0).any()


def test_utility_upcycling_gives_each_pool_the_copies_its_own_utility_ranks(trained):
    """A vanilla model has a pool per layer: each pool's extra copies follow that pool's utility."""
    config, payload, _ = trained["vanilla_top1"]
    experts = config.moe.experts_per_pool(config.model.num_layers)
    pools = len(config.moe.pool_layout(config.model.num_layers))
    assert pools > 1
    utility = [torch.roll(torch.arange(experts, dtype=torch.float64), 3 * p) for p in range(pools)]  # rankings differ
    result = upcycle(config, payload["model"], {}, 2, "utility", utility, noise=0.0)
    for p in range(pools):
        assert result.sources_per_pool[p] == replica_sources(experts, 2, utility[p])
        torch.testing.assert_close(result.model_state[f"expert_pools.{p}.w_up"],
                                   payload["model"][f"expert_pools.{p}.w_up"][torch.tensor(result.sources_per_pool[p])])


@pytest.mark.parametrize("training", [False, True])
def test_expert_utility_leaves_f_bar_and_mode_alone(trained, training):
    config, payload, _ = trained["softmax_top2"]
    model = model_from(config, payload["model"]).train(training)
    stats = model.pool_stats[0]
    assert bool(stats.has_load_fraction)  # aux_loss=pool: the checkpoint carries the lagged load
    f_bar = stats.load_fraction.clone()
    expert_utility(model, utility_batches(config, 2, 2)[0])
    assert model.training is training and all(m.training is training for m in model.modules())
    assert bool(stats.has_load_fraction) and torch.equal(stats.load_fraction, f_bar)
    assert int(stats.step_counts.sum()) == 0  # the scoring passes' counts are not left for the next step


def test_optimizer_state_copied_to_replicas(trained):
    config, payload, _ = trained["softmax_top2"]
    utility = [torch.arange(config.moe.experts_per_pool(config.model.num_layers), dtype=torch.float64)]
    result = upcycle(config, payload["model"], payload["optimizer"], 2, "utility", utility, optimizer="copy")
    sources = torch.tensor(result.sources_per_pool[0])
    for name in ("expert_pools.0.w_up", "layers.1.ffn.router.weight"):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(result.optimizer_state[name][key], payload["optimizer"][name][key][sources])
            torch.testing.assert_close(result.model_state[name], payload["model"][name][sources])
    assert set(result.optimizer_state) == set(payload["optimizer"])
    assert upcycle(config, payload["model"], payload["optimizer"], 2).optimizer_state == {}  # reset


def test_dense_to_vanilla_upcycling_keeps_the_function(data_cache):
    dense = small_config(data_cache, "dense")
    torch.manual_seed(3)
    dense_state = LanguageModel(dense.model, dense.moe).state_dict()
    target = small_config(data_cache, "vanilla", "moe.router=softmax", "moe.normalize_gates=true", "moe.top_k=2",
                          "moe.expert_ffn_hidden_size=128", "moe.num_experts=4")
    result = upcycle_dense(dense, dense_state, target)
    torch.manual_seed(12345)  # fresh parameters (the routers) come from the target's seed, not the caller's RNG
    again = upcycle_dense(dense, dense_state, target)
    assert all(torch.equal(again.model_state[name], value) for name, value in result.model_state.items())
    after = torch.rand(3)
    torch.manual_seed(12345)
    assert torch.equal(after, torch.rand(3))  # and the caller's RNG is where it was
    batch = tokens(dense)
    with torch.no_grad():
        expected = model_from(dense, dense_state)(batch[:, :-1])[0]
        actual = model_from(result.config, result.model_state)(batch[:, :-1])[0]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # a shared expert is a new always-on branch: it starts at 0 so the function is kept
    shared = small_config(data_cache, "vanilla", "moe.router=softmax", "moe.normalize_gates=true", "moe.top_k=2",
                          "moe.expert_ffn_hidden_size=128", "moe.num_experts=4", "moe.shared_expert_ffn_hidden_size=64")
    with_shared = upcycle_dense(dense, dense_state, shared)
    with torch.no_grad():
        actual = model_from(with_shared.config, with_shared.model_state)(batch[:, :-1])[0]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert with_shared.model_state["layers.0.ffn.shared_expert.w_gate.weight"].std() > 0  # initialised as usual
    mismatched = small_config(data_cache, "vanilla", "moe.expert_ffn_hidden_size=64")
    with pytest.raises(ValueError, match="expert width 64 must equal the dense FFN width 128"):
        upcycle_dense(dense, dense_state, mismatched)


def test_dense_to_unipool_pool_experts_copy_the_moe_layers_in_turn(data_cache):
    """UniPool: pool expert j is the FFN of the (j mod L)-th MoE layer, so every layer's FFN is in the
    pool (here 2 MoE layers, 1 and 3, into 6 experts: 1, 3, 1, 3, 1, 3); dense layers keep their own.
    Every layer routes over all of them, so no router keeps the dense function: NormRouter with
    capacity (the paper's UniPool) is accepted, which vanilla targets refuse."""
    dense = small_config(data_cache, "dense")
    torch.manual_seed(3)
    dense_state = LanguageModel(dense.model, dense.moe).state_dict()
    target = small_config(data_cache, "unipool", "moe.router=norm", "moe.capacity_factor=1.25",
                          "moe.expert_ffn_hidden_size=128", "moe.moe_layer_interval=2", "moe.pool_size=6")
    result = upcycle_dense(dense, dense_state, target)
    assert result.sources_per_pool == [[1, 3, 1, 3, 1, 3]]
    for w in ("w_gate", "w_up", "w_down"):
        for j, layer in enumerate(result.sources_per_pool[0]):
            assert torch.equal(result.model_state[f"expert_pools.0.{w}"][j], dense_state[f"layers.{layer}.ffn.{w}.weight"])
        assert torch.equal(result.model_state[f"layers.0.ffn.{w}.weight"], dense_state[f"layers.0.ffn.{w}.weight"])


@pytest.mark.parametrize("overrides, message", [
    # raw softmax gates scale each copied FFN by its probability, about 1/experts
    (["moe.normalize_gates=false"], "set moe.normalize_gates=true or moe.softmax_before_topk=false"),
    (["model.rope_base=50000"], "model.rope_base: dense 10000.0 vs target 50000.0"),
    (["model.norm_eps=0.01"], "model.norm_eps: dense 1e-05 vs target 0.01"),
    # layers 0 and 2 stay dense and copy the dense FFNs, so their width must match too
    (["moe.moe_layer_interval=2", "model.ffn_hidden_size=256", "moe.expert_ffn_hidden_size=128"],
     "model.ffn_hidden_size: dense 128 vs target 256"),
    # gates not summing to 1 (relative error of the FFN output 0.44-0.46 when these were accepted), or drops
    (["moe.router=sigmoid", "moe.normalize_gates=false"], "sigmoid gates .* set moe.normalize_gates=true"),
    (["moe.router=norm", "moe.normalize_gates=false"], "NormRouter gates are scaled scores that do not sum to 1"),
    (["moe.capacity_factor=1.5"], "moe.capacity_factor drops the tokens over an expert's capacity"),
])
def test_dense_upcycling_refuses_a_target_computing_another_function(data_cache, overrides, message):
    dense = small_config(data_cache, "dense")
    dense_state = LanguageModel(dense.model, dense.moe).state_dict()
    target = small_config(data_cache, "vanilla", "moe.expert_ffn_hidden_size=128", "moe.normalize_gates=true", *overrides)
    with pytest.raises(ValueError, match=message):
        upcycle_dense(dense, dense_state, target)
    longer = small_config(data_cache, "vanilla", "moe.expert_ffn_hidden_size=128", "moe.normalize_gates=true",
                          "model.seq_len=64")
    upcycle_dense(dense, dense_state, longer)  # RoPE depends on the position alone: a longer context is fine
    mixtral = small_config(data_cache, "vanilla", "moe.expert_ffn_hidden_size=128", "moe.softmax_before_topk=false")
    upcycle_dense(dense, dense_state, mixtral)  # softmax over the k chosen: gates sum to 1


@pytest.mark.parametrize("args, message", [
    # the utility is a mean over the batches: none gave NaN scores
    (["--selection", "utility", "--utility-batches", "0"], "--utility-batches must be at least 1, not 0"),
    (["--selection", "utility", "--utility-batches", "-2"], "--utility-batches must be at least 1, not -2"),
    (["--multiplier", "1"], "--multiplier must be at least 2, not 1"),
    (["--noise", "nan"], "--noise must be a finite value of at least 0, not nan"),
    (["--noise", "-1"], "--noise must be a finite value of at least 0, not -1.0"),
    (["--selection", "utility", "--multiplier", str(MAX_EXTRA + 2)],
     f"--multiplier must be at most {MAX_EXTRA + 1}, not {MAX_EXTRA + 2}"),
])
def test_tool_refuses_bad_arguments_before_loading(tmp_path, args, message):
    """Refused by the parser, before the checkpoint is read (there is none here) or experts are scored."""
    done = subprocess.run([sys.executable, str(REPO / "tools" / "upcycle.py"), "--checkpoint", str(tmp_path / "none"),
                           "--output", str(tmp_path / "out"), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "no checkpoint" not in done.stderr and not (tmp_path / "out").exists()


def test_tool_dense_example_of_the_readme(data_cache, tmp_path):
    """The documented dense example: configs/tiny_vanilla_cpu.json has raw softmax gates, refused until
    --set moe.normalize_gates=true (applied to --to-config); pool-growing flags are ignored, with a warning."""
    from megatron_unipool.training.checkpoint import load_trained_model, write_run_directory

    dense = load_config(REPO / "configs/tiny_dense_cpu.json", [f"data.cache_dir={data_cache}"])
    torch.manual_seed(5)
    dense_state = LanguageModel(dense.model, dense.moe).state_dict()
    write_run_directory(tmp_path / "dense", dense, dense_state, {}, {"consumed_samples": 0})
    command = [sys.executable, str(REPO / "tools" / "upcycle.py"), "--checkpoint", str(tmp_path / "dense"),
               "--to-config", str(REPO / "configs/tiny_vanilla_cpu.json")]
    refused = subprocess.run(command + ["--output", str(tmp_path / "raw")], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "set moe.normalize_gates=true or moe.softmax_before_topk=false" in refused.stderr
    done = subprocess.run(command + ["--set", "moe.normalize_gates=true", "--multiplier", "3", "--optimizer", "copy",
                                     "--output", str(tmp_path / "moe")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "warning: --multiplier, --optimizer ignored" in done.stderr and "--selection" not in done.stderr
    assert "copies per source" not in done.stdout and "pool 3: 8 experts copying the FFNs of layers [3]" in done.stdout
    _, _, config, model = load_trained_model(tmp_path / "moe")
    assert config.moe.normalize_gates and config.moe.num_experts == 8
    # into UniPool with a pool smaller than the MoE layers: the layers left out are named
    small_pool = subprocess.run([*command[:-1], str(REPO / "configs/tiny_unipool_cpu.json"), "--set", "moe.pool_size=2",
                                 "--output", str(tmp_path / "pool2")], capture_output=True, text=True, timeout=300)
    assert small_pool.returncode == 0, small_pool.stderr[-2000:]
    assert "note: the FFNs of layers [2, 3] are in no expert" in small_pool.stderr
    batch = tokens(dense)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(batch[:, :-1])[0], model_from(dense, dense_state)(batch[:, :-1])[0],
                                   rtol=1e-5, atol=1e-5)


def test_dense_upcycling_keeps_reading_the_source_data_in_its_order(data_cache, tmp_path, capsys):
    """The checkpoint carries the dense run's position in its data (consumed samples), meaningful only in that
    run's sample order and data: --to-config's seed, data and document masking are replaced by the source's (with
    a note), unless a --set chooses them, or the source is at sample 0 (an imported model); a changed seq_len is
    named, as at a resume."""
    from megatron_unipool.training.checkpoint import write_run_directory
    tool = tool_module("upcycle")
    dense = load_config(REPO / "configs/tiny_dense_cpu.json", [f"data.cache_dir={data_cache}", "train.seed=7"])
    for name, consumed in (("dense", 32), ("fresh", 0)):
        write_run_directory(tmp_path / name, dense, LanguageModel(dense.model, dense.moe).state_dict(), {},
                            {"consumed_samples": consumed})
    imported = dataclasses.replace(dense, data=dataclasses.replace(dense.data, tokenizer="gpt2"))  # its --set named it
    write_run_directory(tmp_path / "imported", imported, LanguageModel(dense.model, dense.moe).state_dict(), {},
                        {"consumed_samples": 0, "tokenizer": "gpt2"})
    to_config = REPO / "configs/tiny_vanilla_cpu.json"
    target = load_config(to_config, world_size=None)
    assert target.train.seed != 7 and target.data.cache_dir != dense.data.cache_dir  # what the tool must replace

    def written(name: str, *overrides: str, source: str = "dense"):
        assert tool.main(["--checkpoint", str(tmp_path / source), "--to-config", str(to_config), "--set",
                          "moe.normalize_gates=true", *overrides, "--output", str(tmp_path / name)]) == 0
        payload = load_checkpoint(resolve_checkpoint(tmp_path / name))
        assert payload["train_state"]["consumed_samples"] == (0 if source in ("fresh", "imported") else 32)
        return config_from_dict(json.loads((tmp_path / name / "config.json").read_text()), world_size=None)

    fresh = written("from_fresh", source="fresh")
    assert fresh.train.seed == target.train.seed and fresh.data == target.data
    assert "note" not in capsys.readouterr().err
    # no position to keep, but the ids are the import's tokenizer's: its data.tokenizer stays, unless --set
    from_import = written("from_import", source="imported")
    assert from_import.data == dataclasses.replace(target.data, tokenizer="gpt2") and from_import.train.seed == target.train.seed
    assert ("note: the upcycled run keeps the source's data.tokenizer='gpt2' (--to-config: 'byte'): the model's ids are"
            " its tokens") in capsys.readouterr().err
    assert written("chosen_tokenizer", "--set", "data.tokenizer=byte", source="imported").data.tokenizer == "byte"
    assert "keeps the source's" not in capsys.readouterr().err
    kept = written("kept")
    assert kept.train.seed == 7 and kept.data == dense.data and kept.moe.kind == "vanilla"
    assert (f"note: the upcycled run continues the source's data at sample 32, so it keeps the source's train.seed=7"
            f" (--to-config: {target.train.seed}), data.cache_dir={dense.data.cache_dir!r}") in capsys.readouterr().err
    chosen = written("chosen", "--set", "train.seed=9", "--set", f"data.cache_dir={target.data.cache_dir}",
                     "--set", "model.seq_len=32")
    assert chosen.train.seed == 9 and chosen.data.cache_dir == target.data.cache_dir
    err = capsys.readouterr().err
    assert "keeps the source's" not in err
    assert (f"note: model.seq_len=32, the source's run had {dense.model.seq_len}: the run continues at sample 32 of 32-token samples, not"
            " at the token where the source's data stopped") in err
    # a source that read its documents masked keeps doing so, unless --set says otherwise
    masked = dataclasses.replace(dense, model=dataclasses.replace(dense.model, document_masking=True))
    write_run_directory(tmp_path / "masked", masked, LanguageModel(masked.model, masked.moe).state_dict(), {},
                        {"consumed_samples": 32})
    assert written("from_masked", source="masked").model.document_masking
    assert "model.document_masking=True (--to-config: False)" in capsys.readouterr().err
    assert not written("unmasked", "--set", "model.document_masking=false", source="masked").model.document_masking
    assert "document_masking" not in capsys.readouterr().err


def test_tool_output_continues_with_the_launcher(trained, tmp_path):
    config, payload, run_dir = trained["softmax_top2"]
    out = tmp_path / "upcycled"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "upcycle.py"), "--checkpoint", str(run_dir),
                           "--multiplier", "2", "--selection", "utility", "--utility-batches", "2", "--output", str(out),
                           "--set", "train.max_steps=2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "continue with" in done.stdout and "scored 2/2 batches in" in done.stdout  # utility scoring's progress
    written = config_from_dict(json.loads((out / "config.json").read_text()), world_size=None)
    assert written.moe.pool_size == 2 * config.moe.experts_per_pool(config.model.num_layers)
    upcycled = load_checkpoint(resolve_checkpoint(out))["train_state"]  # the ids mean what the source's meant
    assert upcycled["tokenizer"] == payload["train_state"]["tokenizer"] == "byte"
    for key in ("training_content", "tokenizer_vocab_size", "eod_id"):  # what it read, and its tokenizer
        assert upcycled[key] == payload["train_state"][key] is not None, key
    # without --run-dir a config inside a run directory continues that run (runs/config would start a fresh model)
    done = subprocess.run([sys.executable, str(REPO / "launch" / "pretrain.py"), "--config", str(out / "config.json")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from {out / 'checkpoints' / 'step_0000000'}" in done.stdout and not (tmp_path / "runs").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and all(loss == loss for loss in summary["train_losses"])
    assert summary["consumed_samples"] == payload["train_state"]["consumed_samples"] + 2 * config.train.global_batch
    # the first step trains the upcycled weights: its loss is the source model's, not a fresh model's
    assert summary["train_losses"][0] < payload["train_state"]["train_losses"][0] - 0.5
    # another run directory starts from them too (checkpoint.load), not from a fresh model
    done = subprocess.run([sys.executable, str(REPO / "launch" / "pretrain.py"), "--config", str(out / "config.json"),
                           "--run-dir", str(tmp_path / "elsewhere")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from {out / 'checkpoints' / 'step_0000000'}" in done.stdout
    elsewhere = json.loads((tmp_path / "elsewhere" / "summary.json").read_text())
    assert elsewhere["train_losses"][0] == summary["train_losses"][0]
    again = subprocess.run([sys.executable, str(REPO / "tools" / "upcycle.py"), "--checkpoint", str(run_dir),
                            "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already holds a checkpoint" in again.stderr
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("kept")  # the output is written whole: other files are refused
    again = subprocess.run([sys.executable, str(REPO / "tools" / "upcycle.py"), "--checkpoint", str(run_dir),
                            "--output", str(tmp_path / "notes")], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already holds files" in again.stderr
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["mine.txt"]
    assert config_to_dict(written)["model"] == config_to_dict(config)["model"]


@pytest.mark.parametrize("arguments, message", [
    (["--to-config", "configs/tiny_vanilla_cpu.json"], "error: --to-config is for a dense checkpoint"),
    (["--set", "moe.pool_size=5"], "after --set, the upcycled weights do not fit the model its config describes:\n"
                                   "  expert_pools.0.w_gate: checkpoint (64, 128, 64) vs model (5, 128, 64)"),
    # every tensor fits 8 heads of 8 and 4 KV heads, read as other heads (the resume refused it, after the work)
    (["--set", "model.num_heads=8", "--set", "model.num_kv_heads=4"],
     "--set would change what the upcycled weights compute:\n  model.num_heads=8 (the checkpoint's is 4)\n"
     "  model.num_kv_heads=4 (the checkpoint's is 2)"),
    # each refused by the launch of the written run, whatever its world size (and a rerun by the output it left)
    (["--set", "train.micro_batch=3"], "train.global_batch=8 must be a multiple of train.micro_batch=3\n"),
    (["--set", "deepspeed.zero_stage=1"], "deepspeed.zero_stage=1 is set but deepspeed.enabled is false"),
    (["--output-is-a-file"], "is a file, not a directory"),
    (["--output-under-a-file"], "upcycled is a file, not a directory"),
    (["--output-is-the-cwd"], "--output . holds the directory this command runs in"),
    # 64 experts of 3 x 128 x 64 copied 10^12 times: no host holds it (it ran out of memory, or never ended)
    (["--multiplier", str(10**12)], "error: the model upcycled x1000000000000 holds"),
])
def test_upcycle_refuses_what_would_write_an_unusable_run(trained, tmp_path, arguments, message):
    """Each was accepted: --to-config silently ignored, a config whose pool does not fit the written
    weights (found only when continuing), or the output lost after the work."""
    _, _, run_dir = trained["softmax_top2"]
    out = tmp_path / "upcycled"
    cwd = REPO
    if arguments in (["--output-is-a-file"], ["--output-under-a-file"]):
        out.write_text("")
        out, arguments = (out if arguments == ["--output-is-a-file"] else out / "run"), []
    if arguments == ["--output-is-the-cwd"]:  # replacing it would pull the directory from under the command
        out.mkdir()
        cwd, out, arguments = out, Path("."), []
    done = subprocess.run([sys.executable, str(REPO / "tools" / "upcycle.py"), "--checkpoint", str(run_dir),
                           "--output", str(out), *arguments], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not (out / "checkpoints").exists()


def test_upcycle_checks_host_memory_for_all_it_builds(trained, data_cache, tmp_path, monkeypatch, capsys):
    """--optimizer copy also builds the grown pool's two AdamW moments (the check counted the weights alone: 2 GB
    used where 0.4 GB were checked); a dense checkpoint's target model and its state were not checked at all (the
    allocator's traceback). At exactly the memory needed the work starts."""
    from megatron_unipool.training import hardware
    from megatron_unipool.training.checkpoint import write_run_directory

    class Started(Exception):
        pass

    def start(*args, **kwargs):
        raise Started

    tool = tool_module("upcycle")
    monkeypatch.setattr(tool, "upcycle", start)
    monkeypatch.setattr(tool, "upcycle_dense", start)
    config, _, run_dir = trained["softmax_top2"]
    budget = param_budget(config.model, config.moe)
    grown = budget.total_params + budget.expert_params  # x2
    for optimizer, values in (("copy", 3 * grown), ("reset", grown)):
        arguments = ["--checkpoint", str(run_dir), "--optimizer", optimizer, "--output", str(tmp_path / optimizer)]
        monkeypatch.setattr(hardware, "available_host_memory", lambda: 4 * values - 1)
        assert tool.main(arguments) == 2
        assert "error: the model upcycled x2" + (" with its copied AdamW moments" if optimizer == "copy" else " holds") \
            in capsys.readouterr().err
        monkeypatch.setattr(hardware, "available_host_memory", lambda: 4 * values)
        with pytest.raises(Started):
            tool.main(arguments)

    dense = load_config(REPO / "configs/tiny_dense_cpu.json", [f"data.cache_dir={data_cache}"])
    write_run_directory(tmp_path / "dense", dense, LanguageModel(dense.model, dense.moe).state_dict(), {},
                        {"consumed_samples": 0})
    arguments = ["--checkpoint", str(tmp_path / "dense"), "--to-config", str(REPO / "configs/tiny_vanilla_cpu.json"),
                 "--set", "moe.normalize_gates=true", "--output", str(tmp_path / "moe")]
    target = load_config(REPO / "configs/tiny_vanilla_cpu.json", ["moe.normalize_gates=true"], world_size=None)
    values = 2 * param_budget(target.model, target.moe).total_params
    monkeypatch.setattr(hardware, "available_host_memory", lambda: 4 * values - 1)
    assert tool.main(arguments) == 2
    assert "error: the upcycled model (built, then copied into its state) holds" in capsys.readouterr().err
    monkeypatch.setattr(hardware, "available_host_memory", lambda: 4 * values)
    with pytest.raises(Started):
        tool.main(arguments)


def test_upcycle_cli_hands_every_option_to_the_library(trained, tmp_path, monkeypatch, capsys):
    """Each option reaches the library call it names (replacing any of them by a constant went
    unnoticed), the defaults are the documented ones, and the written run names its source and
    reports the copies of every source expert."""
    tool = tool_module("upcycle")
    calls = {}

    def spy(name, real):
        def record(*args, **kwargs):
            calls[name] = args
            return real(*args, **kwargs)
        return record

    for name in ("upcycle", "expert_utility", "utility_batches"):
        monkeypatch.setattr(tool, name, spy(name, getattr(tool, name)))
    config, _, run_dir = trained["softmax_top2"]
    assert config.train.micro_batch > 1  # so that a batch size of 1 would show
    assert tool.main(["--checkpoint", str(run_dir), "--output", str(tmp_path / "defaults")]) == 0
    assert calls.keys() == {"upcycle"} and calls["upcycle"][3:] == (2, "uniform", None, 1e-3, "reset", 0)
    written = load_checkpoint(resolve_checkpoint(tmp_path / "defaults"))
    assert written["upcycled_from"] == str(resolve_checkpoint(run_dir))
    printed = capsys.readouterr().out
    for p, sources in enumerate(written["sources_per_pool"]):
        copies = [sources.count(e) for e in range(max(sources) + 1)]
        assert f"pool {p}: {len(sources)} experts; copies per source: {copies}\n" in printed

    calls.clear()
    assert tool.main(["--checkpoint", str(run_dir), "--output", str(tmp_path / "chosen"), "--multiplier", "3",
                      "--selection", "utility", "--utility-score", "weight_x_grad", "--utility-batches", "2",
                      "--noise", "0.05", "--optimizer", "copy", "--seed", "7"]) == 0
    assert calls["utility_batches"][1:] == (2, config.train.micro_batch)
    assert calls["expert_utility"][2] == "weight_x_grad"
    multiplier, selection, utility, *rest = calls["upcycle"][3:]
    assert (multiplier, selection, rest) == (3, "utility", [0.05, "copy", 7]) and utility is not None
    # softmax_top2 has no bias balancing: the routers never read the noise, which the tool says
    assert "warning: --noise has no effect" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # a relative path given with --set means the directory the tool runs in
    assert tool.main(["--checkpoint", str(run_dir), "--output", str(tmp_path / "balanced"), "--noise", "0.05",
                      "--set", "moe.bias_balancing=true", "--set", "data.cache_dir=cache"]) == 0
    assert "--noise" not in capsys.readouterr().err
    assert json.loads((tmp_path / "balanced" / "config.json").read_text())["data"]["cache_dir"] == str(tmp_path / "cache")
    # a capacity factor grows with the pool, which the tool says, unless --set chose one
    _, _, capacity_run = trained["capacity_top1"]
    assert tool.main(["--checkpoint", str(capacity_run), "--output", str(tmp_path / "capacity")]) == 0
    assert ("note: moe.capacity_factor 1.25 -> 2.5: capacity is per expert" in capsys.readouterr().err)
    assert tool.main(["--checkpoint", str(capacity_run), "--output", str(tmp_path / "capacity_set"),
                      "--set", "moe.capacity_factor=1.25"]) == 0
    assert "capacity_factor" not in capsys.readouterr().err


# ---- routing probe (tools/routing_probe.py): shares the trained checkpoints above ----

def test_random_routing_draws_uniformly_from_the_candidates(trained):
    from megatron_unipool.training.probe import RandomRouting

    config, payload, _ = trained["softmax_top2"]
    model = model_from(config, payload["model"])
    router = model.layers[1].ffn.router
    candidates = torch.tensor([3, 7, 11, 20])
    x = torch.randn(4000, config.model.hidden_size)
    routing = RandomRouting(router, candidates, torch.Generator().manual_seed(0))(x)
    learned = router(x)
    assert set(routing.indices_TK.unique().tolist()) == set(candidates.tolist())
    assert (routing.indices_TK[:, 0] != routing.indices_TK[:, 1]).all()  # k distinct experts per token
    counts = torch.bincount(routing.indices_TK.flatten(), minlength=32)[candidates].double()
    assert (counts / counts.sum() - 0.25).abs().max() < 0.02  # 8000 draws: uniform within 2 points
    # each of the k gates is 1/k of the learned gates' sum, not the learned split
    torch.testing.assert_close(routing.gates_TK, learned.gates_TK.sum(-1, keepdim=True).expand(-1, 2) / 2)
    # NormRouter: a token with no positive score, which the learned router sends nowhere, is sent nowhere
    config, payload, _ = trained["norm_top1"]
    router = model_from(config, payload["model"]).layers[1].ffn.router
    nowhere = -router.weight.detach().sum(0)  # every logit negative
    x = torch.cat([torch.randn(200, config.model.hidden_size), nowhere.unsqueeze(0)])
    learned, routing = router(x), RandomRouting(router, candidates, torch.Generator().manual_seed(0))(x)
    assert not learned.active_TK[-1].any() and learned.active_TK[:-1].any()
    assert torch.equal(routing.active_TK, learned.active_TK.any(-1, keepdim=True))


def test_probe_averages_its_seeds_and_leaves_the_model_as_it_was(trained):
    """Each row's loss is the mean over the seeds' draws; afterwards the learned routers are back
    and evaluation has recorded no routing statistics (it runs in eval mode)."""
    from megatron_unipool.moe.router import Router
    from megatron_unipool.training.probe import next_token_scores, probe, random_routing

    config, payload, _ = trained["softmax_top2"]
    model = LanguageModel(config.model, config.moe)
    model.load_state_dict(payload["model"])  # in train mode, as built
    batches = [tokens(config)]
    baseline, rows = probe(model, batches, [1], top_n=None, seeds=3)
    assert isinstance(model.layers[1].ffn.router, Router) and not model.training
    assert next_token_scores(model, batches) == baseline
    with torch.no_grad():  # next-token accuracy: the share of targets that are the most likely id
        logits = model(batches[0][:, :-1])[0]
    assert baseline.accuracy == (logits.argmax(-1) == batches[0][:, 1:]).double().mean().item() > 0
    assert not model.pool_stats[0].step_counts.any()
    draws = []
    for seed in range(3):
        with random_routing(model.layers[1].ffn, torch.arange(model.layers[1].ffn.pool.num_experts), seed):
            draws.append(next_token_scores(model, batches))
    assert len({draw.loss for draw in draws}) == 3 and rows[0].loss == pytest.approx(sum(d.loss for d in draws) / 3,
                                                                                    rel=1e-12)
    assert rows[0].accuracy == pytest.approx(sum(d.accuracy for d in draws) / 3, rel=1e-12)
    assert rows[0].accuracy_delta == pytest.approx(rows[0].accuracy - baseline.accuracy, rel=1e-12)


def test_most_used_experts_ignores_empty_slots_and_breaks_ties_by_index():
    from megatron_unipool.training.probe import most_used_experts

    picks = torch.tensor([[0, -1], [3, 3], [-1, -1], [2, 3], [2, -1]])  # uses: 0 once, 2 twice, 3 three times
    assert most_used_experts(picks, 5, 2).tolist() == [3, 2]
    assert most_used_experts(picks, 5, 5).tolist() == [3, 2, 0, 1, 4]
    # a pool of 32 all tied: torch's unstable sort reorders ties from about 32 elements up
    assert most_used_experts(torch.arange(32).repeat(3).view(-1, 2), 32, 4).tolist() == [0, 1, 2, 3]


def one_against_all_top2_model(data_cache):
    """A NormRouter top-2 model whose layer-0 router sees one expert against all others: tokens on one side
    have a single positive score, so their second slot picks no expert."""
    config = small_config(data_cache, "unipool", "moe.router=norm", "moe.top_k=2")
    torch.manual_seed(0)
    model = LanguageModel(config.model, config.moe).eval()
    router = model.layers[0].ffn.router
    direction = torch.randn(config.model.hidden_size)
    with torch.no_grad():
        router.weight.copy_(-direction.expand_as(router.weight))
        router.weight[0] = direction
    return config, model


def test_recorded_routing_marks_the_slots_norm_router_leaves_empty(data_cache):
    """The slots NormRouter leaves without an expert are recorded as -1."""
    from megatron_unipool.training.probe import record_routing

    config, model = one_against_all_top2_model(data_cache)
    router = model.layers[0].ffn.router
    expected = []
    router.register_forward_hook(lambda module, inputs, routing: expected.append(
        torch.where(routing.active_TK, routing.indices_TK, -1)))
    _, recorded = record_routing(model, [tokens(config)])
    expected = torch.cat(expected)
    assert (expected == -1).any() and (expected != -1).any()
    assert torch.equal(recorded[0], expected)


def test_probe_tool_reports_each_layer(trained, tmp_path):
    config, payload, run_dir = trained["softmax_top2"]
    out = tmp_path / "probe"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "routing_probe.py"), "--checkpoint", str(run_dir),
                           "--layers", "all", "--top-n", "4", "--output", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "  1/4 layers probed" in done.stdout and "  4/4 layers probed" in done.stdout
    report = json.loads((out / "probe.json").read_text())
    # the learned routing's loss is the run's own final validation loss (same batches; the checkpoint is saved
    # before that evaluation, summary.json has it)
    final = json.loads((run_dir / "summary.json").read_text())["final_val_loss"]
    assert report["baseline"] == pytest.approx(final, rel=1e-5)
    assert sorted((r["layer"], r["candidates"]) for r in report["rows"]) == sorted(
        (layer, name) for layer in range(4) for name in ("pool", "top4"))
    assert sum(r["delta"] for r in report["rows"] if r["candidates"] == "pool") > 0  # random routing hurts on average
    for r in report["rows"]:  # the accuracy change against the learned routing's, printed in points
        assert r["accuracy_delta"] == pytest.approx(r["accuracy"] - report["baseline_accuracy"], abs=1e-12)
        assert (f"{r['layer']:>5} {r['candidates']:>12} {r['loss']:>8.4f} {r['delta']:>+8.4f} {r['accuracy']:>9.2%}"
                f" {100 * r['accuracy_delta']:>+7.2f}") in done.stdout
    assert 0 < report["baseline_accuracy"] < 1
    assert f"next-token accuracy {report['baseline_accuracy']:.2%}" in done.stdout
    assert (out / "probe.png").stat().st_size > 0
    bad = subprocess.run([sys.executable, str(REPO / "tools" / "routing_probe.py"), "--checkpoint", str(run_dir),
                          "--layers", "7"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "are not MoE layers" in bad.stderr
    bad = subprocess.run([sys.executable, str(REPO / "tools" / "routing_probe.py"), "--checkpoint", str(run_dir),
                          "--layers", "last"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--layers 'last': expected deep, all, or comma-separated layer numbers" in bad.stderr
    (tmp_path / "a_file").write_text("")
    for tool in ("routing_probe.py", "plot_utilisation.py"):  # refused before the work, not after it
        for output in (tmp_path / "a_file", tmp_path / "a_file" / "probe"):
            bad = subprocess.run([sys.executable, str(REPO / "tools" / tool), "--checkpoint", str(run_dir), "--output",
                                  str(output)], capture_output=True, text=True, timeout=300)
            assert bad.returncode == 2 and bad.stderr == f"error: --output {output}: {tmp_path / 'a_file'} is a file, not a" \
                " directory\n" and "probed" not in bad.stdout, bad.stderr[-2000:]


def test_probe_checks_its_arguments_before_reading_data(trained, monkeypatch, capsys):
    """A wrong --layers or --top-n is reported before the validation data is read."""
    tool = tool_module("routing_probe")
    read = []
    monkeypatch.setattr(tool, "routing_batches", lambda *args: read.append(args) or [])
    _, _, run_dir = trained["softmax_top2"]
    for arguments, message in ((["--layers", "7"], "are not MoE layers"), (["--top-n", "1"], "is below moe.top_k=2")):
        assert tool.main(["--checkpoint", str(run_dir), *arguments]) == 2
        assert message in capsys.readouterr().err
    assert read == []


def test_probe_layers_are_each_probed_once_in_model_order():
    chosen = tool_module("routing_probe").chosen_layers
    assert chosen("3,1,3", [1, 3, 5, 7]) == [1, 3]  # a repeated layer was probed, printed and written twice
    assert chosen("deep", [1, 3, 5, 7]) == [5, 7] and chosen("all", [1, 3]) == [1, 3]


def test_probe_cli_hands_its_options_on_and_writes_where_asked(trained, tmp_path, monkeypatch, capsys):
    """--top-n equal to k is allowed; --top-n, --seeds and --eval-batches reach the probe and the data;
    the results go to ./probe by default and to a nested --output."""
    tool = tool_module("routing_probe")
    seen = {}

    def spy(name, real):
        def record(*args, **kwargs):
            seen[name] = args
            return real(*args, **kwargs)
        return record

    for name in ("probe", "routing_batches"):
        monkeypatch.setattr(tool, name, spy(name, getattr(tool, name)))
    monkeypatch.chdir(tmp_path)
    config, _, run_dir = trained["softmax_top2"]
    assert tool.main(["--checkpoint", str(run_dir), "--top-n", "2", "--seeds", "3", "--eval-batches", "1",
                      "--layers", "1"]) == 0
    assert seen["routing_batches"][1] == 1 and seen["probe"][2:5] == ([1], 2, 3)
    assert f"on {config.train.global_batch} validation sequences" in capsys.readouterr().out  # one global batch
    assert json.loads((tmp_path / "probe" / "probe.json").read_text())["rows"]
    assert tool.main(["--checkpoint", str(run_dir), "--eval-batches", "1", "--layers", "1",
                      "--output", str(tmp_path / "a" / "b")]) == 0
    assert (tmp_path / "a" / "b" / "probe.json").is_file()


def test_probe_has_no_top_n_row_repeating_the_pool(trained, tmp_path):
    """Vanilla: the default N (moe.num_experts) is the whole pool; a top-N row would repeat the pool row."""
    from megatron_unipool.training.probe import probe

    config, payload, run_dir = trained["vanilla_top1"]
    done = subprocess.run([sys.executable, str(REPO / "tools" / "routing_probe.py"), "--checkpoint", str(run_dir),
                           "--eval-batches", "1", "--output", str(tmp_path / "probe")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "probe" / "probe.json").read_text())["rows"]
    assert [(r["layer"], r["candidates"]) for r in rows] == [(2, "pool"), (3, "pool")]  # --layers deep
    model = model_from(config, payload["model"])
    batches = [tokens(config)]
    _, rows = probe(model, batches, [1], top_n=config.moe.num_experts + 4)
    assert [r.candidates for r in rows] == ["pool"]
    with pytest.raises(ValueError, match="seeds must be at least 1, not 0"):
        probe(model, batches, [1], top_n=None, seeds=0)


@pytest.mark.parametrize("tool, args, message", [
    ("routing_probe.py", ["--seeds", "0"], "--seeds must be at least 1, not 0"),
    ("routing_probe.py", ["--eval-batches", "0"], "--eval-batches must be at least 1, not 0"),
    ("plot_utilisation.py", ["--eval-batches", "-1"], "--eval-batches must be at least 1, not -1"),
    ("plot_utilisation.py", ["--eval-batches", "0"], "--eval-batches must be at least 1, not 0"),  # not the run's default
])
def test_analysis_tools_refuse_empty_averages(tmp_path, tool, args, message):
    done = subprocess.run([sys.executable, str(REPO / "tools" / tool), "--checkpoint", str(tmp_path / "none"),
                           "--output", str(tmp_path / "out"), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_utilisation_figure_stays_readable_for_many_vanilla_layers():
    """48 vanilla layers are 48 one-row pools: one panel (not 48 4-inch columns), at most 16 layer labels,
    and the colorbar leaves the heatmap's expert columns above the bars below."""
    import numpy as np

    from megatron_unipool.training.plots import utilisation_figure

    rng = np.random.default_rng(0)
    for counts, layers in (([rng.integers(0, 50, (1, 8)) for _ in range(48)], [[i] for i in range(48)]),
                           ([rng.integers(0, 50, (40, 64))], [list(range(40))])):
        fig = utilisation_figure(counts, "test", layers)
        fig.draw_without_rendering()  # the constrained layout, as saving or TensorBoard's drawing runs it
        width, height = fig.get_size_inches()
        heat, bars = fig.axes[0], fig.axes[1]
        labels = [t.get_text() for t in heat.get_yticklabels()]
        assert width <= 8 and height <= 8
        assert 8 <= len(labels) <= 16 and labels[0] == "0"
        assert heat.get_xlabel() == "expert" and heat.get_ylabel() == "layer"
        assert heat.get_position().x0 == pytest.approx(bars.get_position().x0, abs=1e-6)
        assert heat.get_position().x1 == pytest.approx(bars.get_position().x1, abs=1e-6)
        assert heat.get_xlim() == pytest.approx(bars.get_xlim())  # expert j's column above its bar


def test_utilisation_figure_shows_each_layers_shares_and_the_pools_load():
    """Heatmap rows are each layer's shares of its slots, labelled with the model layers (dense ones
    in between skip); the bars are each expert's share of the pool's slots over all layers, with the
    uniform share marked; single-row pools stack into one panel, pools of several rows do not."""
    import numpy as np

    from megatron_unipool.training.plots import utilisation_figure

    counts = np.array([[6, 0, 2, 0], [0, 4, 0, 4]])
    fig = utilisation_figure([counts], "test", [[1, 3]])
    heat, bars = fig.axes[0], fig.axes[1]
    np.testing.assert_allclose(heat.images[0].get_array(), [[0.75, 0, 0.25, 0], [0, 0.5, 0, 0.5]])
    assert [t.get_text() for t in heat.get_yticklabels()] == ["1", "3"]
    np.testing.assert_allclose([bar.get_height() for bar in bars.patches], np.array([6, 4, 2, 4]) / 16)
    assert bars.lines[0].get_ydata()[0] == pytest.approx(1 / 4)
    fig = utilisation_figure([counts[:1], counts[1:]], "test", [[1], [3]])  # vanilla: one row per pool
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["1", "3"] and len(fig.axes[0].images) == 1
    fig = utilisation_figure([counts[:1], np.vstack([counts, counts])], "test", [[0], [1, 2, 3, 4]])
    assert sum(len(ax.images) for ax in fig.axes) == 2  # two pools, two panels


def test_tools_read_a_gpu_runs_checkpoint_with_kernels_that_run_here(trained, tmp_path):
    """A run's kernel settings (Triton, flash-attn) are for its own GPUs: a tool builds the model with the
    defaults, the same function, and keeps the run's settings in the config it reports or writes."""
    from megatron_unipool.training.checkpoint import load_trained_model, write_run_directory

    config, payload, _ = trained["softmax_top2"]
    gpu_run = dataclasses.replace(config, model=dataclasses.replace(
        config.model, swiglu_kernel="triton", rope_kernel="triton", attention="flash", expert_gemm="triton"))
    write_run_directory(tmp_path / "gpu_run", gpu_run, payload["model"], {}, payload["train_state"])
    _, _, read, model = load_trained_model(tmp_path / "gpu_run")
    assert read.model.swiglu_kernel == "triton" and model.config.swiglu_kernel == "torch"
    batch = tokens(config)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(batch[:, :-1])[0], model_from(config, payload["model"])(batch[:, :-1])[0])


def test_a_directory_written_through_a_symlink_lands_where_it_points_and_a_killed_replacement_is_recovered(tmp_path):
    from megatron_unipool.training.outputs import recover_replaced_directory, write_directory

    (tmp_path / "scratch").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "scratch")  # e.g. a run directory linked to a scratch disk
    write_directory(tmp_path / "out", lambda directory: (directory / "config.json").write_text("new"))
    assert (tmp_path / "out").is_symlink() and (tmp_path / "scratch" / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "scratch"]
    # killed between its two renames: the old output waits aside until the next command puts it back
    (tmp_path / "scratch").rename(tmp_path / ".scratch.old")
    recover_replaced_directory(tmp_path / "out")
    assert (tmp_path / "scratch" / "config.json").read_text() == "new" and not (tmp_path / ".scratch.old").exists()


def test_an_output_directory_that_cannot_be_made_or_written_is_named_and_nothing_is_created(tmp_path):
    from megatron_unipool.training.outputs import check_output_directory

    check_output_directory(tmp_path / "new" / "nested", "--output new/nested")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=f"^--output file/x: {tmp_path / 'file'} is a file, not a directory$"):
        check_output_directory(tmp_path / "file" / "x", "--output file/x")
    if Path("/proc/sys").is_dir():  # a directory no one writes in, root included
        with pytest.raises(ValueError, match=r"^--output /proc/sys/x: cannot write in /proc/sys \("):
            check_output_directory(Path("/proc/sys/x"), "--output /proc/sys/x")


def test_save_atomically_keeps_the_previous_file_when_a_write_fails(tmp_path):
    import matplotlib.pyplot as plt

    from megatron_unipool.training.outputs import save_atomically

    path = tmp_path / "report.json"
    written = []
    save_atomically(path, lambda temporary: written.append(temporary) or temporary.write_text("old"))
    assert written[0].parent == tmp_path  # the rename stays on one file system: atomic

    def half_written(temporary):
        temporary.write_text("partial")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        save_atomically(path, half_written)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    fig, _ = plt.subplots()
    save_atomically(tmp_path / "plot.png", lambda temporary: fig.savefig(temporary, format="png"))
    plt.close(fig)
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png", "report.json"]


def test_unique_experts_by_depth_closed_form():
    from megatron_unipool.training.probe import unique_experts_by_depth

    routing = {0: torch.tensor([[0, 1], [2, 3]]), 1: torch.tensor([[1, 2], [2, -1]]), 3: torch.tensor([[0, 3], [5, 6]])}
    shared = unique_experts_by_depth(routing, {0: 0, 1: 0, 3: 0}, 8)
    assert shared == [2.0, 2.5, 4.0]  # token 0: {0,1} {0,1,2} {0,1,2,3}; token 1: {2,3} {2,3} {2,3,5,6}
    per_layer = unique_experts_by_depth(routing, {0: 0, 1: 1, 3: 2}, 8)
    assert per_layer == [2.0, 3.5, 5.5]  # separate pools: every pick is a new expert


def test_utilisation_tool_counts_every_routed_slot(trained, tmp_path):
    """Its counts are the experts the layers pick (expert 0 included), its loads their shares of the
    pool, and its depth curve that of one pool shared by all four layers; written to ./utilisation."""
    from megatron_unipool.training.probe import load_routed_model, record_routing, routing_batches, unique_experts_by_depth

    config, payload, run_dir = trained["softmax_top2"]
    out = tmp_path / "utilisation"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "plot_utilisation.py"), "--checkpoint", str(run_dir),
                           "--eval-batches", "2"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "utilisation.json").read_text())
    tokens = 2 * config.train.global_batch * config.model.seq_len  # --eval-batches counts global batches
    counts = torch.tensor(report["counts_per_pool"][0])
    assert counts.shape == (4, 32) and (counts.sum(1) == tokens * 2).all()  # top-2, dropless, every layer
    _, _, model = load_routed_model(run_dir, "")
    _, routing = record_routing(model, *routing_batches(config, 2))
    assert report["moe_layers"] == [0, 1, 2, 3] and report["pools"] == [[0, 1, 2, 3]]
    for layer in range(4):
        assert counts[layer].tolist() == torch.bincount(routing[layer].flatten(), minlength=32).tolist()
    assert report["load_per_pool"][0] == pytest.approx((counts.sum(0) / counts.sum()).tolist())
    curve = report["unique_experts_by_depth"]
    assert curve == pytest.approx(unique_experts_by_depth(routing, {layer: 0 for layer in range(4)}, 32))
    assert curve[0] == 2.0 and all(a <= b <= a + 2 for a, b in zip(curve, curve[1:]))
    assert (out / "utilisation.png").stat().st_size > 0 and (out / "unique_experts.png").stat().st_size > 0
    assert report["slots_per_layer"] == [tokens * 2] * 4 and report["unrouted_share_per_layer"] == [0.0] * 4
    assert "reached no expert" not in done.stdout


def test_utilisation_tool_says_which_share_of_the_slots_norm_router_leaves_empty(trained, tmp_path):
    """NormRouter routes a token to no expert where no score clears the threshold: the heatmap shares
    are of the routed slots, so the report gives each layer's slots and the share that reached none."""
    from megatron_unipool.training.probe import load_routed_model, record_routing, routing_batches

    config, _, run_dir = trained["norm_top1"]
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "plot_utilisation.py"), "--checkpoint", str(run_dir),
                           "--eval-batches", "1", "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "utilisation.json").read_text())
    _, _, model = load_routed_model(run_dir, "")
    _, routing = record_routing(model, *routing_batches(config, 1))
    empty = [(routing[layer] < 0).double().mean().item() for layer in range(4)]
    assert report["slots_per_layer"] == [routing[layer].numel() for layer in range(4)]
    assert report["unrouted_share_per_layer"] == pytest.approx(empty) and max(empty) > 0
    assert ("slots that reached no expert (not in the heatmap's shares): "
            + ", ".join(f"layer {layer} {100 * share:.1f}%" for layer, share in enumerate(empty))) in done.stdout


def test_utilisation_tools_unrouted_share_is_of_the_slots_at_top2(data_cache, tmp_path):
    """At top-2 a layer has two slots per token: the share that reached no expert is of those."""
    from megatron_unipool.training.checkpoint import write_run_directory
    from megatron_unipool.training.probe import record_routing, routing_batches

    config, model = one_against_all_top2_model(data_cache)
    write_run_directory(tmp_path / "run", config, model.state_dict(), {}, {"consumed_samples": 0})
    assert tool_module("plot_utilisation").main(["--checkpoint", str(tmp_path / "run"), "--eval-batches", "1",
                                                 "--output", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "utilisation.json").read_text())
    _, routing = record_routing(model, *routing_batches(config, 1))
    assert report["slots_per_layer"][0] == routing[0].numel() == 2 * config.train.global_batch * config.model.seq_len
    assert report["unrouted_share_per_layer"][0] == pytest.approx((routing[0] < 0).double().mean().item())
    assert report["unrouted_share_per_layer"][0] > 0


def test_reproduction_tool_aggregates_seeds_and_resumes(data_cache, tmp_path):
    out = tmp_path / "repro"
    command = [sys.executable, str(REPO / "tools" / "reproduce.py"), "--seeds", "2", "1", "--models", "vanilla", "unipool",
               "--output", str(out)] + [item for o in SMALL + ["train.max_steps=3", f"data.cache_dir={data_cache}"]
                                        for item in ("--set", o)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"vanilla", "unipool"} and all(len(runs) == 2 for runs in results.values())
    seeds = [json.loads((out / "unipool" / f"seed{s}" / "summary.json").read_text())["final_val_loss"] for s in (1, 2)]
    assert seeds[0] != seeds[1]  # different seeds, different runs
    assert [(row["seed"], row["final_val_loss"]) for row in results["unipool"]] == [(2, seeds[1]), (1, seeds[0])]
    assert f"{sum(seeds) / 2:.4f}" in (out / "results.md").read_text()
    assert "unipool below vanilla" in (out / "results.md").read_text()
    assert (out / "curves.png").stat().st_size > 0
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)  # every run is done: nothing retrained
    assert again.returncode == 0 and json.loads((out / "results.json").read_text()) == results
    assert "training" not in again.stdout


@pytest.fixture
def reproduce_tool(monkeypatch):
    """tools/reproduce.py as a module whose launcher is a stub: (module, the run directories it was given).
    The stub's commands are in module.commands."""
    module = tool_module("reproduce")
    launched, module.commands = [], []

    def launch(command, log):
        run_dir = Path(command[command.index("--run-dir") + 1])
        launched.append(run_dir)
        module.commands.append(command)
        log.write("".join(f"log line {i}\n" for i in range(40)))
        if "moe.aux_loss=layer" in command:  # the ablation's run fails
            return 1, 0
        (run_dir / "summary.json").write_text(json.dumps({
            "final_val_loss": 2.0 + 0.1 * len(launched), "final_train_loss": 2.0, "total_params": 1e6,
            "active_params": 1e6, "tokens_per_second": 1.0, "train_losses": [3.0, 2.5, 2.0]}))
        return 0, 0

    monkeypatch.setattr(module, "train_in_child", launch)
    return module, launched


def test_reproduction_reuses_runs_of_the_same_settings_given_in_another_order(reproduce_tool, tmp_path, monkeypatch):
    module, launched = reproduce_tool
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=f"error: --output {tmp_path / 'file' / 'out'}: {tmp_path / 'file'} is a file"):
        module.main(["--output", "file/out"])
    args = ["--seeds", "1", "--models", "vanilla", "--output", "out", "--set", "train.max_steps=3"]
    assert module.main(args + ["--set", "train.lr=0.001"]) == 0 and len(launched) == 1
    assert module.main(["--set", "train.lr=1e-3"] + args) == 0 and len(launched) == 1  # reused
    with pytest.raises(SystemExit, match="was trained with the overrides"):
        module.main(args + ["--set", "train.lr=0.001", "--set", "train.lr=0.002"])


def test_reproduction_refuses_runs_of_other_overrides(reproduce_tool, tmp_path, monkeypatch, capsys):
    module, launched = reproduce_tool
    monkeypatch.chdir(tmp_path)  # a relative --output is where the user is
    args = ["--seeds", "1", "--models", "vanilla", "--output", "rel"]
    assert module.main(args + ["--set", "train.max_steps=3"]) == 0
    run_dir = tmp_path / "rel" / "vanilla" / "seed1"
    assert launched == [run_dir] and (run_dir / "summary.json").is_file() and (tmp_path / "rel" / "results.json").is_file()
    assert json.loads((run_dir / "overrides.json").read_text()) == ["train.max_steps=3"]
    out = capsys.readouterr().out
    assert f"training vanilla seed 1: log in {run_dir / 'log.txt'}" in out
    assert "The paper's ordering" not in out  # one model: no pair of the ordering to check (it printed a bare title)
    assert module.main(args + ["--set", "train.max_steps=3"]) == 0 and len(launched) == 1  # reused
    with pytest.raises(SystemExit, match=re.escape(f"{run_dir} was trained with the overrides ['train.max_steps=3']")):
        module.main(args + ["--set", "train.max_steps=4"])
    with pytest.raises(SystemExit, match="was trained with the overrides"):
        module.main(args)
    (run_dir / "overrides.json").unlink()  # a run of an older reproduce.py
    with pytest.raises(SystemExit, match="no overrides.json"):
        module.main(args + ["--set", "train.max_steps=3"])
    assert len(launched) == 1 and not list(tmp_path.rglob(".*.tmp"))
    # a stale run anywhere (a later seed of a later model; only a checkpoint, from an interrupted run) is
    # refused before anything trains
    stale = tmp_path / "other" / "unipool" / "seed2"
    (stale / "checkpoints").mkdir(parents=True)
    (stale / "overrides.json").write_text(json.dumps(["train.max_steps=9"]))
    with pytest.raises(SystemExit, match=re.escape(f"{stale} was trained with the overrides ['train.max_steps=9']")):
        module.main(["--seeds", "1", "2", "--models", "vanilla", "unipool", "--output", "other"])
    assert len(launched) == 1
    # one seed twice is one run counted twice: a spread of 0 the orderings would be judged against
    with pytest.raises(SystemExit):
        module.main(["--seeds", "1", "1", "--models", "vanilla", "--output", "dup"])
    assert "--seeds must differ from each other, got [1, 1]" in capsys.readouterr().err and len(launched) == 1


def test_reproduction_report_states_each_ordering_against_the_seed_spread():
    """Mean +- sample std per model; 'held' needs the gap to beat the larger of the two stds, a gap
    under it is 'held, within the seed spread', a gap the wrong way 'did not hold'."""
    module = tool_module("reproduce")

    def runs(*losses):
        return [{"final_val_loss": loss, "total_params": 2e6, "active_params": 1e6} for loss in losses]

    text = module.report({"dense": runs(1.9, 1.9), "vanilla": runs(2.0, 2.2), "unipool": runs(1.5, 1.7),
                          "unipool-67%": runs(2.0, 2.0)})
    assert "| vanilla | 2.00M | 1.00M | 2.1000 +- 0.1414 | 2 |" in text  # the sample std (population: 0.1000)
    assert "- vanilla below dense: did not hold (2.1000 vs 1.9000, largest std 0.1414)" in text
    assert "- unipool below vanilla: held (1.6000 vs 2.1000, largest std 0.1414)" in text
    assert "- unipool-67% below vanilla: held, within the seed spread (2.0000 vs 2.1000, largest std 0.1414)" in text
    one_seed = module.report({"vanilla": runs(2.0), "unipool": runs(1.5), "dense": runs(1.9)})  # no spread: no verdict
    assert "- unipool below vanilla: held (one seed: no spread to judge it) (1.5000 vs 2.0000" in one_seed
    assert "- vanilla below dense: did not hold (one seed) (2.0000 vs 1.9000" in one_seed


def test_reproduction_plot_reads_a_skipped_steps_null_loss_as_a_gap(tmp_path, monkeypatch):
    module = tool_module("reproduce")
    drawn, draw = {}, module.plt.Axes.plot

    def recording(ax, x, y, **kwargs):
        drawn[kwargs["label"]] = list(y)
        return draw(ax, x, y, **kwargs)

    monkeypatch.setattr(module.plt.Axes, "plot", recording)
    module.plot({"vanilla": [{"train_losses": [3.0, None, 2.0]}, {"train_losses": [2.0, 2.0, 1.0]}]}, tmp_path / "c.png")
    assert drawn["vanilla"][0] == 2.5 and math.isnan(drawn["vanilla"][1]) and drawn["vanilla"][2] == 1.5
    losses = [4.0 - 0.01 * step for step in range(60)]  # a window of 2 steps: the skipped step's neighbours stand
    module.plot({"dense": [{"train_losses": losses[:30] + [None] + losses[31:]}]}, tmp_path / "c.png")
    assert drawn["dense"] == pytest.approx([(a + b) / 2 for a, b in zip(losses, losses[1:])][:29] + [losses[29], losses[31]]
                                           + [(a + b) / 2 for a, b in zip(losses[31:], losses[32:])])
    assert (tmp_path / "c.png").stat().st_size > 0


def test_reproduction_trains_seed_by_seed_without_checkpoints_and_reuses_reduced_pools(reproduce_tool, tmp_path):
    """Whole seeds of every model first (an interrupted reproduction compares like with like), no
    checkpoints written, a reduced pool's own override recorded so that a rerun reuses it, and
    results.json holding each run's numbers."""
    module, launched = reproduce_tool
    args = ["--seeds", "1", "2", "--models", "vanilla", "unipool-50%", "--output", str(tmp_path)]
    assert module.main(args) == 0
    assert launched == [tmp_path / name / f"seed{seed}" for seed in (1, 2) for name in ("vanilla", "unipool-50%")]
    assert all("checkpoint.save_interval=0" in command for command in module.commands)
    assert json.loads((tmp_path / "unipool-50%" / "seed2" / "overrides.json").read_text()) == ["moe.pool_size=16"]
    results = json.loads((tmp_path / "results.json").read_text())
    summary = json.loads((tmp_path / "unipool-50%" / "seed2" / "summary.json").read_text())
    assert results["unipool-50%"][1] == {"seed": 2, **{key: summary[key] for key in (
        "final_val_loss", "final_train_loss", "total_params", "active_params", "tokens_per_second", "train_losses")}}
    assert module.main(args) == 0 and len(launched) == 4  # every run reused, none refused


@pytest.mark.parametrize("resize, full_pool", [([], 32), (["moe.num_experts=4"], 16), (["moe.moe_layer_interval=2"], 16),
                                               (["model.num_layers=6"], 48)])
def test_reduced_pools_are_their_share_of_the_full_pool_the_set_leaves(reproduce_tool, tmp_path, resize, full_pool):
    """unipool-67% / -50% are those shares of the full pool (MoE layers x experts per layer) of the config as --set
    leaves it: a --set of the layers or experts per layer resizes them with it, so their labels stay true."""
    module, _ = reproduce_tool
    assert module.main(["--seeds", "1", "--models", "unipool-67%", "unipool-50%", "--output", str(tmp_path),
                        *(item for o in resize for item in ("--set", o))]) == 0
    for name, share in (("unipool-67%", 0.67), ("unipool-50%", 0.5)):
        recorded = json.loads((tmp_path / name / "seed1" / "overrides.json").read_text())
        pool = round(share * full_pool)
        assert recorded == [f"moe.pool_size={pool}", *resize]
        config = load_config(REPO / "configs/tiny_unipool_cpu.json", recorded, world_size=None)
        budget = param_budget(config.model, config.moe)
        assert budget.expert_budget_percent == pytest.approx(100 * pool / full_pool)


def test_reproduction_checks_every_runs_settings_before_training(reproduce_tool, tmp_path, capsys):
    """What the tool sets per run (the seed) or per model (a reduced pool's size, the ablation's router) is
    not the user's to --set: the seeds became one run (+- 0) or a model another than its label; a --set
    that one model refuses, a repeated model, or a bad seed ended the reproduction after the others trained."""
    module, launched = reproduce_tool
    out = ["--output", str(tmp_path / "out")]
    refusals = [
        (["--models", "dense", "--set", "train.seed=7"], "error: --set train.seed: reproduce.py sets these per run"),
        (["--models", "vanilla", "unipool-67%", "--set", "moe.pool_size=16", "--set", "train.lr=0.01"],
         "error: --set moe.pool_size: reproduce.py sets these per run or per model"),
        (["--models", "unipool", "--set", "moe.router=softmax"],  # "unipool" would be the ablation
         "error: --set moe.router: reproduce.py sets these per run or per model"),
        (["--models", "dense", "vanilla", "--set", "moe.layers_per_pool=2"], "error: vanilla seed 1: inconsistent config:\n  moe.pool_size and"),
        (["--models", "dense", "--seeds", "1", "-1"], "error: dense seed -1: invalid config:\n  train.seed: -1 must be >= 0"),
    ]
    for arguments, message in refusals:
        with pytest.raises(SystemExit) as refused:
            module.main(arguments + out)
        assert str(refused.value.code).startswith(message), refused.value.code
    with pytest.raises(SystemExit):
        module.main(["--models", "dense", "dense"] + out)
    assert "--models must differ from each other, got ['dense', 'dense']" in capsys.readouterr().err
    assert launched == [] and not (tmp_path / "out").exists()  # a refused reproduction leaves no directory behind
    assert module.main(["--models", "vanilla", "--seeds", "1", "--set", "moe.router=norm"] + out) == 0  # its own setting
    assert launched == [tmp_path / "out" / "vanilla" / "seed1"]


def test_reproduction_refuses_damaged_records_in_one_line(reproduce_tool, tmp_path):
    """overrides.json is the file the tool asks people to write by hand, and a summary.json may be cut short:
    each is named with what to do, not a traceback."""
    module, launched = reproduce_tool
    args = ["--models", "vanilla", "--seeds", "1", "--output", str(tmp_path)]
    run_dir = tmp_path / "vanilla" / "seed1"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text('{"final_val_loss": 2.')
    for written in ("[train.max_steps=4", "[1]", '{"train.max_steps": 4}'):
        (run_dir / "overrides.json").write_text(written)
        with pytest.raises(SystemExit, match=re.escape(f"error: {run_dir / 'overrides.json'} is not a JSON list of"
                                                       " section.key=value strings")):
            module.main(args)
    (run_dir / "overrides.json").write_text("[]")
    with pytest.raises(SystemExit, match=re.escape(f"error: {run_dir / 'summary.json'} is damaged")):
        module.main(args)
    assert launched == []


# The tool signalled the moment its run has started, before it could have known the run's pid.
SIGNAL_AS_THE_RUN_STARTS = """
import os, signal, subprocess, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1] + "/tests")
from script_modules import load_script
popen = subprocess.Popen
def started_then_signalled(*args, **kwargs):
    child = popen(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    return child
subprocess.Popen = started_then_signalled
with open(sys.argv[2], "a") as log:
    status, stop = load_script(Path(sys.argv[1]) / "tools" / "reproduce.py").train_in_child(
        [sys.executable, "-c", sys.argv[3]], log)
print(stop, status in (3, -signal.SIGTERM))
"""


def test_reproduction_passes_on_a_signal_that_came_as_its_run_started(tmp_path):
    """The handlers are in place before the run starts: a signal then is passed on once the run exists (it
    killed the tool and left the run training without it)."""
    done = subprocess.run([sys.executable, "-c", SIGNAL_AS_THE_RUN_STARTS, str(REPO), str(tmp_path / "log.txt"),
                           SIGNALLED_LAUNCH], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, f"{int(signal.SIGTERM)} True\n"), done.stderr


def test_reproduction_stopped_by_a_signal_exits_as_a_shell_reports_it(reproduce_tool, tmp_path, monkeypatch, capsys):
    """The run ended by a forwarded SIGTERM: exit 143, one line saying how to continue, and no results
    written from the runs so far."""
    module, launched = reproduce_tool
    monkeypatch.setattr(module, "train_in_child", lambda command, log: (1, signal.SIGTERM))
    with pytest.raises(SystemExit) as stopped:
        module.main(["--models", "vanilla", "--seeds", "1", "--output", str(tmp_path)])
    assert stopped.value.code == 143
    assert capsys.readouterr().err == ("reproduce: interrupted (SIGTERM) during vanilla seed 1; run the same command"
                                       " again to continue (a SIGTERM-stopped run resumes from its checkpoint)\n")
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "results.md").exists()


def test_reproduction_runs_the_launch_in_the_callers_directory(tmp_path, monkeypatch):
    """Relative paths in --set (a data prefix) are the caller's: the launch gets no other working directory."""
    module = tool_module("reproduce")
    given = {}

    class Launched:
        def __init__(self, command, **kwargs):
            given.update(kwargs)

        def wait(self):
            return 0

    monkeypatch.setattr(module.subprocess, "Popen", Launched)
    with open(tmp_path / "log.txt", "a") as log:
        assert module.train_in_child(["launch"], log) == (0, 0)
    assert "cwd" not in given and given["start_new_session"] is True


def test_reproduction_appends_a_resumed_runs_log(reproduce_tool, tmp_path):
    module, launched = reproduce_tool
    run_dir = tmp_path / "vanilla" / "seed1"
    (run_dir / "checkpoints").mkdir(parents=True)  # stopped by a signal: its checkpoint and the log so far
    (run_dir / "overrides.json").write_text("[]")
    (run_dir / "log.txt").write_text("step 1 of the first part\n")
    assert module.main(["--models", "vanilla", "--seeds", "1", "--output", str(tmp_path)]) == 0
    assert (run_dir / "log.txt").read_text().startswith("step 1 of the first part\nlog line 0\n")


# A stand-in for launch/pretrain.py that says which signal reached it; run through reproduce.train_in_child.
SIGNALLED_LAUNCH = """
import signal, sys, time
received = []
def stop(signum, frame):
    print("launch stopped by", signal.Signals(signum).name, flush=True)
    received.append(signum)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
print("launch ready", flush=True)
deadline = time.monotonic() + 120  # a run the signal never reached must not outlive a failed test for long
while not received and time.monotonic() < deadline:
    time.sleep(0.01)
time.sleep(0.5)  # as a checkpoint is saved: a second signal would be seen
sys.exit(3)
"""
TRAIN_IN_CHILD = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1] + "/tests")
from script_modules import load_script
with open(sys.argv[2], "a") as log:
    print(load_script(Path(sys.argv[1]) / "tools" / "reproduce.py").train_in_child([sys.executable, "-c", sys.argv[3]], log))
"""


@pytest.mark.parametrize("stop, passed_on", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGINT),
                                             (signal.SIGHUP, signal.SIGTERM)])
def test_reproduction_passes_a_signal_on_to_its_run_once(tmp_path, stop, passed_on):
    """A signal to the tool alone (kill, a scheduler, a closed terminal) is passed on and waited for: no
    trainer left running in the run directory; a hangup stops it as SIGTERM does (it saves). Ctrl-C, sent to
    the terminal's whole process group, reaches the run once: the run has its own session, so only through
    the tool."""
    log = tmp_path / "log.txt"
    tool = subprocess.Popen([sys.executable, "-c", TRAIN_IN_CHILD, str(REPO), str(log), SIGNALLED_LAUNCH],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # the tool imports torch first: slow on a loaded machine
        while "launch ready" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline and tool.poll() is None, "the stand-in launch never started"
            time.sleep(0.05)
        if stop == signal.SIGINT:
            os.killpg(tool.pid, stop)  # as a terminal's Ctrl-C: the tool's whole process group
        else:
            tool.send_signal(stop)
        out, _ = tool.communicate(timeout=60)
    finally:
        tool.kill()
    assert out.strip() == f"(3, {int(stop)})"
    assert log.read_text() == f"launch ready\nlaunch stopped by {passed_on.name}\n"


def test_reproduction_reports_a_failed_run_with_its_log(reproduce_tool, tmp_path):
    module, launched = reproduce_tool
    with pytest.raises(SystemExit) as failure:
        module.main(["--seeds", "1", "--models", "vanilla", "shared-pool-layer-aux-softmax", "--output", str(tmp_path)])
    message = str(failure.value.code)
    log = tmp_path / "shared-pool-layer-aux-softmax" / "seed1" / "log.txt"
    assert message.startswith("error: shared-pool-layer-aux-softmax seed 1 failed (exit status 1)")
    assert str(log) in message and "log line 39" in message and "log line 5\n" not in message


@pytest.mark.parametrize("tool, message", [("routing_probe.py", "there is no routing to probe"),
                                           ("plot_utilisation.py", "it has no experts")])
def test_routing_tools_refuse_a_dense_checkpoint(data_cache, tmp_path, tool, message):
    config = small_config(data_cache, "dense", "train.max_steps=1", "train.eval_batches=1")
    Trainer(config, tmp_path / "dense", device=torch.device("cpu")).train()
    done = subprocess.run([sys.executable, str(REPO / "tools" / tool), "--checkpoint", str(tmp_path / "dense"),
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip() == f"error: the checkpoint is a dense model: {message}"
    assert not (tmp_path / "out").exists()


def test_reproduction_refuses_a_set_of_the_model_kind(reproduce_tool, tmp_path):
    """moe.kind tells the models apart: a --set of it would train a UniPool under the label 'vanilla'."""
    module, launched = reproduce_tool
    with pytest.raises(SystemExit) as refused:
        module.main(["--models", "vanilla", "--seeds", "1", "--set", "moe.kind=unipool", "--output", str(tmp_path)])
    assert str(refused.value.code).startswith("error: --set moe.kind: reproduce.py sets these per run or per model")
    assert launched == []


def test_reproduction_checks_the_set_with_each_models_own_overrides(reproduce_tool, tmp_path):
    """A --set valid for the UniPool (NormRouter) but not for the softmax ablation, whose router is its own
    override: refused before the UniPool trains."""
    module, launched = reproduce_tool
    with pytest.raises(SystemExit) as refused:
        module.main(["--models", "unipool", "shared-pool-layer-aux-softmax", "--seeds", "1",
                     "--set", "moe.norm_router_c=1.0", "--output", str(tmp_path)])
    assert str(refused.value.code).startswith("error: shared-pool-layer-aux-softmax seed 1: inconsistent config:\n"
                                              "  moe.norm_router_c applies to moe.router='norm' only")
    assert launched == []


def test_reproduction_lets_a_set_turn_checkpoints_on(reproduce_tool, tmp_path):
    """Checkpoints are off by default but the user's to turn on: the --set comes after the tool's own
    checkpoint.save_interval=0, so it is the one the launch applies."""
    module, launched = reproduce_tool
    assert module.main(["--models", "vanilla", "--seeds", "1", "--set", "checkpoint.save_interval=50",
                        "--output", str(tmp_path)]) == 0
    command = module.commands[0]
    settings = [command[i + 1] for i, item in enumerate(command) if item == "--set"]
    assert [s for s in settings if s.startswith("checkpoint.save_interval=")][-1] == "checkpoint.save_interval=50"


def test_reproduction_report_calls_a_tie_not_held():
    module = tool_module("reproduce")

    def runs(*losses):
        return [{"final_val_loss": loss, "total_params": 2e6, "active_params": 1e6} for loss in losses]

    assert "- unipool below vanilla: did not hold (one seed) (2.0000 vs 2.0000" in module.report(
        {"vanilla": runs(2.0), "unipool": runs(2.0)})
    assert "- unipool below vanilla: did not hold (2.0000 vs 2.0000" in module.report(
        {"vanilla": runs(2.0, 2.0), "unipool": runs(2.0, 2.0)})


def test_reproduction_leaves_ignored_signals_ignored_and_restores_its_handlers(tmp_path, monkeypatch):
    """Under nohup SIGHUP stays ignored while the run trains (the run inherits that); SIGTERM and SIGINT are
    caught only while it trains, then the caller's handlers are back."""
    module = tool_module("reproduce")
    during = {}

    class Launched:
        def __init__(self, command, **kwargs):
            pass

        def wait(self):
            during.update({signum: signal.getsignal(signum) for signum in module.FORWARDED})
            return 0

    monkeypatch.setattr(module.subprocess, "Popen", Launched)
    before = {signum: signal.getsignal(signum) for signum in module.FORWARDED}
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves it
    try:
        with open(tmp_path / "log.txt", "a") as log:
            assert module.train_in_child(["launch"], log) == (0, 0)
        assert during[signal.SIGHUP] is signal.SIG_IGN
        assert during[signal.SIGTERM] is not before[signal.SIGTERM] and during[signal.SIGINT] is not before[signal.SIGINT]
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
    finally:
        signal.signal(signal.SIGHUP, before[signal.SIGHUP])


def test_reproduction_reports_the_first_signal_when_a_second_follows(tmp_path, monkeypatch):
    """A SIGTERM, then a Ctrl-C while the run saves: both are passed on, and the tool reports (and exits as)
    the first, the one that stopped the run."""
    import os
    import time

    module = tool_module("reproduce")
    passed_on = []

    class Launched:
        def __init__(self, command, **kwargs):
            pass

        def send_signal(self, signum):
            passed_on.append(signum)

        def wait(self):
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            deadline = time.monotonic() + 10
            while len(passed_on) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            return 143

    monkeypatch.setattr(module.subprocess, "Popen", Launched)
    with open(tmp_path / "log.txt", "a") as log:
        assert module.train_in_child(["launch"], log) == (143, signal.SIGTERM)
    assert passed_on == [signal.SIGTERM, signal.SIGINT]


def test_reproduction_names_a_malformed_set_in_one_line(reproduce_tool, tmp_path):
    """A --set without '=' is a usage error before anything trains, not a traceback."""
    module, launched = reproduce_tool
    with pytest.raises(SystemExit) as refused:
        module.main(["--models", "vanilla", "--seeds", "1", "--set", "train.max_steps", "--output", str(tmp_path)])
    assert refused.value.code == ("error: override 'train.max_steps' must look like section.key=value"
                                  " (e.g. train.max_steps=100)")
    assert launched == []


def test_reproduction_curves_show_losses_that_never_fall_below_the_zoom(tmp_path):
    """The axis was cut at a loss of 4 whatever the curves: runs above it everywhere (a few steps, a large
    vocabulary) got an empty plot with its y axis upside down."""
    module = tool_module("reproduce")
    seen = {}
    original = module.plt.close

    def close(fig):
        seen["ylim"] = fig.axes[0].get_ylim()
        original(fig)

    module.plt.close = close
    try:
        module.plot({"dense": [{"train_losses": [5.8, 5.5, 5.2, 5.0]}]}, tmp_path / "curves.png")
    finally:
        module.plt.close = original
    bottom, top = seen["ylim"]
    assert bottom < 5.0 and top > 5.8


def test_upcycling_noise_follows_its_seed(tiny_config):
    """upcycle(seed=...) draws the copies' bias noise from that seed: the same seed repeats it, another
    seed draws other noise (a repeat of an upcycling with another --seed is another start)."""
    config = tiny_config("configs/tiny_unipool_cpu.json")
    state = LanguageModel(config.model, config.moe).state_dict()
    name = "layers.0.ffn.router.expert_bias"
    runs = [upcycle(config, state, {}, multiplier=2, seed=seed).model_state[name] for seed in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_utility_batches_are_the_first_distinct_training_samples(tiny_config):
    """utility_batches(count, size): the first count x size training samples, in order, each once."""
    config = tiny_config("configs/tiny_unipool_cpu.json")
    batches, eod_id = utility_batches(config, 3, 2)
    assert torch.equal(torch.cat(batches), build_datasets(config).train.batch(0, 3 * 2))
    assert eod_id == build_datasets(config).eod_id


def test_an_interrupt_between_the_renames_leaves_the_previous_output_in_place(tmp_path, monkeypatch):
    """write_directory: "an interrupt leaves one of them whole at `output`", even one that comes after the
    old output was moved aside and before the new one took its place."""
    from megatron_unipool.training.outputs import write_directory

    write_directory(tmp_path / "out", lambda directory: (directory / "config.json").write_text("old"))
    rename = Path.rename

    def interrupted(self, target):
        if self.name == ".out.tmp":  # the new directory's rename, after the old one's
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_directory(tmp_path / "out", lambda directory: (directory / "config.json").write_text("new"))
    assert (tmp_path / "out" / "config.json").read_text() == "old"


def test_routing_tools_compute_in_bf16_where_asked_and_name_a_missing_device(trained, tmp_path, capsys):
    """--precision bf16 runs the passes under bf16 autocast (the loss moves, a little); a --device this
    machine lacks, or one the tools cannot use, is refused before any work."""
    from megatron_unipool.training.probe import analysis_device

    config, payload, run_dir = trained["softmax_top2"]
    probe_tool, plot_tool = tool_module("routing_probe"), tool_module("plot_utilisation")
    baselines = {}
    for precision in ("fp32", "bf16"):
        assert probe_tool.main(["--checkpoint", str(run_dir), "--layers", "1", "--eval-batches", "1", "--device", "cpu",
                                "--precision", precision, "--output", str(tmp_path / precision)]) == 0
        baselines[precision] = json.loads((tmp_path / precision / "probe.json").read_text())["baseline"]
        assert f"(cpu, {precision}; the learned routing first" in capsys.readouterr().out
    assert baselines["bf16"] != baselines["fp32"] and baselines["bf16"] == pytest.approx(baselines["fp32"], rel=0.02)
    assert plot_tool.main(["--checkpoint", str(run_dir), "--eval-batches", "1", "--device", "cpu", "--precision",
                           "bf16", "--output", str(tmp_path / "plots")]) == 0
    assert "(cpu, bf16) ..." in capsys.readouterr().out and (tmp_path / "plots" / "utilisation.json").is_file()
    assert analysis_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device 'gpu': expected cpu, cuda or cuda:N"):
        analysis_device("gpu")
    if not torch.cuda.is_available():
        for tool in (probe_tool, plot_tool):
            assert tool.main(["--checkpoint", str(run_dir), "--device", "cuda", "--output", str(tmp_path / "none")]) == 2
            assert capsys.readouterr().err == "error: --device cuda: this machine has no CUDA device\n"
        assert not (tmp_path / "none").exists()
