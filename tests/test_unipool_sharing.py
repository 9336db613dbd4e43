"""UniPool sharing: one expert pool object used by several MoE layers of a LanguageModel.

Checks identity of the shared pool, that it is counted once in parameters() / state_dict() / the
parameter budget, and that autograd accumulates into a shared parameter exactly the sum of the
per-layer gradients an untied copy of the model computes.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from megatron_unipool.config import ModelConfig, MoEConfig
from megatron_unipool.model import LanguageModel, param_budget
from megatron_unipool.moe import ExpertPool, MoELayer, SwiGLU

POOL_PARAMS = ("w_gate", "w_up", "w_down")
VOCAB = 48


pytestmark = pytest.mark.usefixtures("single_thread")


def model_config(num_layers=4, **overrides):
    settings = {"num_layers": num_layers, "hidden_size": 16, "num_heads": 2, "num_kv_heads": 1, "ffn_hidden_size": 24,
                    "vocab_size": VOCAB, "seq_len": 8, "init_std": 0.1}
    settings.update(overrides)
    return ModelConfig(**settings)


def moe_config(**overrides):
    settings = {"kind": "unipool", "num_experts": 2, "top_k": 2, "router": "norm", "aux_loss": "layer", "aux_loss_coeff": 0.01,
                    "z_loss_coeff": 1e-3}
    settings.update(overrides)
    return MoEConfig(**settings)


def build(model_overrides=None, **moe_overrides):
    torch.manual_seed(0)
    model_cfg, moe_cfg = model_config(**(model_overrides or {})), moe_config(**moe_overrides)
    return LanguageModel(model_cfg, moe_cfg), model_cfg, moe_cfg


# (moe overrides, model overrides, expected MoE layer indices, expected groups of layers per pool, experts/pool)
LAYOUTS = {
    "unipool": ({}, {}, [0, 1, 2, 3], [[0, 1, 2, 3]], 8),
    "unipool-reduced": ({"pool_size": 3}, {}, [0, 1, 2, 3], [[0, 1, 2, 3]], 3),
    "grouped": ({"layers_per_pool": 2}, {}, [0, 1, 2, 3], [[0, 1], [2, 3]], 4),
    "vanilla": ({"kind": "vanilla"}, {}, [0, 1, 2, 3], [[0], [1], [2], [3]], 2),
    "interval2": ({"moe_layer_interval": 2}, {}, [1, 3], [[1, 3]], 4),
    "interval2-vanilla": ({"kind": "vanilla", "moe_layer_interval": 2}, {}, [1, 3], [[1], [3]], 2),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pool_layout_and_identity(layout):
    moe_overrides, model_overrides, moe_indices, groups, experts = LAYOUTS[layout]
    model, _, _ = build(model_overrides, **moe_overrides)
    assert [i for i, block in enumerate(model.layers) if isinstance(block.ffn, MoELayer)] == moe_indices
    assert model.moe_layers() == [model.layers[i].ffn for i in moe_indices]
    for i, block in enumerate(model.layers):
        if i not in moe_indices:
            assert isinstance(block.ffn, SwiGLU)
    assert len(model.expert_pools) == len(groups) == len(model.pool_stats)
    for p, group in enumerate(groups):
        pool = model.expert_pools[p]
        assert isinstance(pool, ExpertPool) and pool.num_experts == experts
        assert tuple(pool.w_gate.shape) == (experts, 24, 16) and tuple(pool.w_down.shape) == (experts, 16, 24)
        for slot, layer_index in enumerate(group):
            layer = model.layers[layer_index].ffn
            assert layer.pool is pool
            assert layer.stats is model.pool_stats[p]
            assert layer.layer_slot == slot and layer.layers_in_pool == len(group)
            assert layer.router.weight.shape == (experts, 16)
            for name in POOL_PARAMS:
                assert getattr(layer.pool, name).data_ptr() == getattr(pool, name).data_ptr()
    # distinct groups never share a pool
    assert len({id(pool) for pool in model.expert_pools}) == len(groups)
    assert model.pool_stats[0].step_counts.shape == (len(groups[0]), experts)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pool_counted_once(layout):
    moe_overrides, model_overrides, _, groups, _ = LAYOUTS[layout]
    model, _, _ = build(model_overrides, **moe_overrides)
    pool_ids = {id(getattr(pool, name)) for pool in model.expert_pools for name in POOL_PARAMS}
    # even without de-duplication, each pool tensor is reached through exactly one module path
    all_named = list(model.named_parameters(remove_duplicate=False))
    hits = [name for name, p in all_named if id(p) in pool_ids]
    assert len(hits) == len(pool_ids) == 3 * len(groups)
    assert sorted(hits) == sorted(f"expert_pools.{i}.{n}" for i in range(len(groups)) for n in POOL_PARAMS)
    assert sum(1 for p in model.parameters() if id(p) in pool_ids) == len(pool_ids)

    keys = list(model.state_dict().keys())
    pool_keys = [k for k in keys if k.split(".")[-1] in POOL_PARAMS and k.startswith("expert_pools")]
    assert sorted(pool_keys) == sorted(hits)
    # no layer re-exports its pool (nor its stats) under its own prefix
    assert not [k for k in keys if ".pool." in k or ".stats." in k]


@pytest.mark.parametrize(
    "moe_overrides,model_overrides",
    [
        ({}, {}),
        ({"router": "softmax"}, {}),
        ({"shared_expert_ffn_hidden_size": 8}, {}),
        ({"pool_size": 3, "granularity": 0.5, "top_k": 1}, {}),
        ({"layers_per_pool": 2}, {}),
        ({"kind": "vanilla", "aux_loss": "layer"}, {}),
        ({"moe_layer_interval": 2, "expert_ffn_hidden_size": 10}, {}),
        ({}, {"tie_embeddings": True}),
        ({"kind": "dense"}, {}),
    ],
    ids=["unipool-norm", "unipool-softmax", "shared-expert", "reduced-fine", "grouped", "vanilla", "interval2",
         "tied", "dense"],
)
def test_parameter_count_matches_budget(moe_overrides, model_overrides):
    model, model_cfg, moe_cfg = build(model_overrides, **moe_overrides)
    budget = param_budget(model_cfg, moe_cfg)
    assert sum(p.numel() for p in model.parameters()) == budget.total_params
    expert_numel = sum(p.numel() for pool in model.expert_pools for p in pool.parameters())
    assert expert_numel == budget.expert_params
    assert budget.num_pools == len(model.expert_pools)


def untied_copy(model):
    """Deep copy in which every MoE layer calls its own private copy of the pool."""
    twin = copy.deepcopy(model)
    for layer in twin.moe_layers():
        object.__setattr__(layer, "pool", copy.deepcopy(layer.pool))
    return twin


def lm_loss(model, tokens):
    logits, losses = model(tokens)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    return loss + sum(losses.values()), logits


@pytest.mark.parametrize(
    "moe_overrides",
    [{}, {"router": "softmax", "shared_expert_ffn_hidden_size": 8, "capacity_factor": 1.0}, {"layers_per_pool": 2},
     {"moe_layer_interval": 2, "router": "sigmoid"}],
    ids=["unipool", "unipool-softmax-shared-capacity", "grouped", "interval2"],
)
def test_shared_gradient_is_sum_of_layer_contributions(moe_overrides):
    model, _, _ = build(**moe_overrides)
    model.double().train()
    twin = untied_copy(model)
    # the copy is really untied, and its pools start from the same values
    twin_layers, layers = twin.moe_layers(), model.moe_layers()
    assert len({id(layer.pool) for layer in twin_layers}) == len(twin_layers)
    for layer, twin_layer in zip(layers, twin_layers):
        for name in POOL_PARAMS:
            assert torch.equal(getattr(layer.pool, name), getattr(twin_layer.pool, name))

    tokens = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(1))
    loss, logits = lm_loss(model, tokens)
    twin_loss, twin_logits = lm_loss(twin, tokens)
    torch.testing.assert_close(twin_logits, logits, rtol=0, atol=0)
    loss.backward()
    twin_loss.backward()

    for p, pool in enumerate(model.expert_pools):
        users = [i for i, layer in enumerate(layers) if layer.pool is pool]
        assert len(users) == len(layers) // len(model.expert_pools)
        for name in POOL_PARAMS:
            shared_grad = getattr(pool, name).grad
            contributions = [getattr(twin_layers[i].pool, name).grad for i in users]
            assert all(c is not None for c in contributions)
            # several layers really contribute: the sum is not just one of its terms
            assert sum(1 for c in contributions if c.abs().sum() > 0) >= 2
            torch.testing.assert_close(shared_grad, torch.stack(contributions).sum(0), rtol=1e-10, atol=1e-14)
        # the unused pools of the twin (still registered in twin.expert_pools) got nothing
        assert all(getattr(twin.expert_pools[p], name).grad is None for name in POOL_PARAMS)

    # every non-pool parameter has the same gradient in both models
    twin_params = dict(twin.named_parameters())
    for name, param in model.named_parameters():
        if name.startswith("expert_pools"):
            continue
        torch.testing.assert_close(param.grad, twin_params[name].grad, rtol=1e-10, atol=1e-14, msg=name)


def test_sharing_survives_dtype_change_state_dict_and_optimizer_step():
    model, model_cfg, moe_cfg = build()
    model.double()
    pool = model.expert_pools[0]
    assert pool.w_gate.dtype == torch.float64
    assert all(layer.pool is pool for layer in model.moe_layers())

    # load a state dict into a fresh model: the pool stays shared and gets the loaded values
    torch.manual_seed(123)
    other = LanguageModel(model_cfg, moe_cfg).double()
    other.load_state_dict(model.state_dict())
    assert all(layer.pool is other.expert_pools[0] for layer in other.moe_layers())
    assert torch.equal(other.moe_layers()[2].pool.w_up, pool.w_up)

    # one optimizer step on the shared tensor is seen by every layer
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    before = pool.w_down.detach().clone()
    lm_loss(model, tokens)[0].backward()
    optimizer.step()
    assert not torch.equal(pool.w_down, before)
    for layer in model.moe_layers():
        assert torch.equal(layer.pool.w_down, pool.w_down)
