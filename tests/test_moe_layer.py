"""MoE layer forward/backward against a slow per-token reference written here with plain torch ops.

The reference follows the semantics of shared/design/unipool.md: fp32 router logits x W^T, softmax /
sigmoid / NormRouter scores, top-k selection (on score + expert_bias when bias balancing), gates,
SwiGLU experts from the pool's [M, F, D] / [M, D, F] weights, capacity ceil(C T k / M) filled in
token order then slot order, plus an optional dense shared expert. Nothing in the reference calls the
library's router, dispatch, expert or loss code.
"""
from __future__ import annotations

import math

import pytest
import torch

from megatron_unipool.config import MoEConfig
from megatron_unipool.moe import ExpertPool, MoELayer, PoolStats, plan_dispatch
from megatron_unipool.moe.lock import PoolLock

from host_syncs import host_syncs
from kernel_models import DEVICE

M, D, F = 8, 16, 24  # experts, hidden, expert width
B, S = 2, 12  # T = 24 tokens
T = B * S
SHARED_F = 12
TOL = {"rtol": 1e-5, "atol": 1e-6}  # routing runs in fp32 by design; everything else is float64



pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------- reference


def ref_silu(h):
    return h * (1.0 / (1.0 + torch.exp(-h)))


def ref_softmax(v):
    e = torch.exp(v - v.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def ref_routing(x_TD, router, cfg, offset=None):
    """(indices [T,k], gates [T,k] float64, balance scores P [T,M], logits [T,M]).

    `offset` [M] (UniPool-lock): added to the logits (softmax, sigmoid) or to the unit vector
    (NormRouter, whose -inf experts are zeroed before the norm); -inf experts are never selected.
    """
    k = cfg.top_k
    logits = x_TD.float() @ router.weight.float().t()
    masked = torch.zeros(logits.shape[-1], dtype=torch.bool) if offset is None else offset == -math.inf
    if offset is not None and cfg.router != "norm":
        logits = logits + offset
    if cfg.router == "softmax":
        scores = ref_softmax(logits)
        balance = scores
    elif cfg.router == "sigmoid":  # 1 / (1 + exp(inf)) is 0, but its gradient would be NaN: masked apart
        scores = torch.where(masked, 0.0, 1.0 / (1.0 + torch.exp(-torch.where(masked, 0.0, logits))))
        balance = scores / scores.sum(dim=-1, keepdim=True)
    else:
        kept = torch.where(masked, 0.0, logits)
        length = torch.sqrt((kept * kept).sum(dim=-1, keepdim=True))
        unit = kept / (length + 1e-8) + (0.0 if offset is None else offset)
        scores = router.scale * router.norm_constant * torch.clamp(unit, min=0.0)
        balance = scores
    selection = scores + router.expert_bias if cfg.bias_balancing else scores
    if cfg.router == "norm" and cfg.bias_balancing:  # the bias only reorders experts with a positive score
        selection = torch.where(scores == 0, -math.inf, selection)
    selection = torch.where(masked, -math.inf, selection)
    # torch.topk on the selection values: NormRouter scores have exact zeros (relu), whose order is
    # unspecified; using the same op keeps the reference's choice among tied zeros identical.
    indices = torch.topk(selection.detach(), k, dim=-1).indices
    if cfg.router == "softmax" and not cfg.softmax_before_topk:
        gates = ref_softmax(torch.gather(logits, 1, indices))
    else:
        gates = torch.gather(scores, 1, indices)
        if cfg.normalize_gates and cfg.router != "norm":
            gates = gates / gates.sum(dim=-1, keepdim=True)
    return indices, gates.to(torch.float64), balance, logits


def ref_expert(pool, e, x_D):
    gate = pool.w_gate[e] @ x_D
    up = pool.w_up[e] @ x_D
    return pool.w_down[e] @ (ref_silu(gate) * up)


def ref_shared(swiglu, x_D):
    gate = swiglu.w_gate.weight @ x_D
    up = swiglu.w_up.weight @ x_D
    return swiglu.w_down.weight @ (ref_silu(gate) * up)


def ref_layer(layer, x):
    """Slow loop over tokens and slots: (output like x, routed counts [M], dropped slots, indices)."""
    cfg = layer.config
    x_TD = x.reshape(-1, x.shape[-1])
    num_tokens, k = x_TD.shape[0], cfg.top_k
    offset = None if layer.lock is None else layer.lock.logit_offset(layer.layer_slot)
    indices, gates, _, _ = ref_routing(x_TD, layer.router, cfg, offset)
    reachable = M if offset is None else int((offset > -math.inf).sum())  # a hard-locked layer: its own experts
    cap = None if cfg.capacity_factor is None else math.ceil(cfg.capacity_factor * num_tokens * k / reachable)
    kept = [0] * M
    routed = [0] * M
    dropped = 0
    rows = []
    for t in range(num_tokens):
        acc = torch.zeros(x_TD.shape[1], dtype=x_TD.dtype)
        for j in range(k):
            e = int(indices[t, j])
            if cfg.router == "norm" and gates[t, j] == 0:
                continue  # NormRouter slot with no weight: not dispatched, not counted
            routed[e] += 1
            if cap is not None and kept[e] >= cap:
                dropped += 1
                continue
            kept[e] += 1
            acc = acc + gates[t, j] * ref_expert(layer.pool, e, x_TD[t])
        if layer.shared_expert is not None:
            acc = acc + ref_shared(layer.shared_expert, x_TD[t])
        rows.append(acc)
    return torch.stack(rows).reshape(x.shape), torch.tensor(routed), dropped, indices


# --------------------------------------------------------------------------- fixtures


def build(seed=0, imbalance=True, **overrides):
    """A float64 standalone layer with its own pool and stats, and an input x [B, S, D]."""
    settings = {"kind": "unipool", "router": "softmax", "top_k": 2, "aux_loss": "none"}
    settings.update(overrides)
    cfg = MoEConfig(**settings)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pool = ExpertPool(M, D, F, 0.2, 0.2)
    stats = PoolStats(1, M, "step")
    layer = MoELayer(cfg, D, pool, stats, 0, 1, 0.3, 0.2)
    pool.double()
    stats.double()
    layer.double()
    x = torch.randn(B, S, D, generator=gen, dtype=torch.float64)
    if imbalance:  # push many tokens to expert 0 so that capacity 1.0 really drops slots
        u = torch.randn(D, generator=gen, dtype=torch.float64)
        u = u / u.norm()
        x = x + 1.0 * u
        with torch.no_grad():
            layer.router.weight[0] += 1.5 * u
    return layer, x.requires_grad_(True)


def params_of(layer):
    params = {"x": None, "router.weight": layer.router.weight}
    if layer.config.router == "norm":
        params["router.scale"] = layer.router.scale
    for name in ("w_gate", "w_up", "w_down"):
        params["pool." + name] = getattr(layer.pool, name)
    if layer.shared_expert is not None:
        for name in ("w_gate", "w_up", "w_down"):
            params["shared." + name] = getattr(layer.shared_expert, name).weight
    return params


def check_against_reference(layer, x):
    """Compares output, gradients, routed counts and dropped count; returns the dropped count."""
    layer.train()
    layer.stats.step_dropped.zero_()
    layer.stats.step_counts.zero_()
    out, _ = layer(x)
    ref_out, ref_routed, ref_dropped, _ = ref_layer(layer, x)
    assert out.shape == x.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, ref_out, **TOL)

    # dropped and routed counts as recorded by the layer (training mode records them)
    assert int(layer.stats.step_dropped) == ref_dropped
    assert torch.equal(layer.stats.micro_batch_counts[layer.layer_slot].cpu(), ref_routed)
    assert torch.equal(layer.stats.step_counts[layer.layer_slot].cpu(), ref_routed)

    # gradients through a fixed random projection of the output
    projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    named = params_of(layer)
    named["x"] = x
    names, tensors = list(named), list(named.values())
    grads = torch.autograd.grad((out * projection).sum(), tensors)
    ref_grads = torch.autograd.grad((ref_out * projection).sum(), tensors)
    for name, g, rg in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, rg, **TOL, msg=lambda m, name=name: f"gradient of {name}: {m}")
    return ref_dropped


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.5], ids=["dropless", "cap1.0", "cap0.5"])
@pytest.mark.parametrize("shared", [0, SHARED_F], ids=["noshared", "shared"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("router", ["softmax", "sigmoid", "norm"])
def test_layer_matches_per_token_reference(router, top_k, shared, capacity_factor):
    layer, x = build(router=router, top_k=top_k, shared_expert_ffn_hidden_size=shared,
                     capacity_factor=capacity_factor)
    dropped = check_against_reference(layer, x)
    if capacity_factor is None:
        assert dropped == 0
    else:
        assert dropped > 0, "the capacity case must actually drop slots"


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "cap1.0"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize(
    "router,softmax_before_topk,normalize_gates",
    [("softmax", False, False), ("softmax", False, True), ("softmax", True, True), ("sigmoid", True, True),
     ("norm", True, True)],
    ids=["mixtral", "mixtral-normalize", "softmax-normalize", "sigmoid-normalize", "norm-normalize-ignored"],
)
def test_gate_variants_match_reference(router, softmax_before_topk, normalize_gates, top_k, capacity_factor):
    layer, x = build(seed=1, router=router, top_k=top_k, softmax_before_topk=softmax_before_topk,
                     normalize_gates=normalize_gates, capacity_factor=capacity_factor)
    check_against_reference(layer, x)

    x_TD = x.detach().reshape(-1, D)
    routing = layer.router(x_TD)
    logits = x_TD.float() @ layer.router.weight.float().t()
    if router == "softmax" and not softmax_before_topk:
        # Mixtral: top-k of the logits, softmax over the k chosen logits
        assert torch.equal(routing.indices_TK.sort(dim=-1).values, logits.topk(top_k, dim=-1).indices.sort(dim=-1).values)
        expected = torch.exp(torch.gather(logits, 1, routing.indices_TK))
        torch.testing.assert_close(routing.gates_TK, expected / expected.sum(-1, keepdim=True), rtol=1e-5, atol=1e-7)
    if router != "norm":
        # every variant except the NormRouter produces gates summing to 1
        torch.testing.assert_close(routing.gates_TK.sum(-1).double(), torch.ones(T, dtype=torch.float64),
                                   rtol=0, atol=1e-6)
    else:
        # NormRouter gates stay the raw scores whatever normalize_gates says
        length = logits.norm(dim=-1, keepdim=True)
        raw = layer.router.scale.float() * layer.router.norm_constant * torch.clamp(logits / (length + 1e-8), min=0)
        torch.testing.assert_close(routing.gates_TK, torch.gather(raw, 1, routing.indices_TK), rtol=1e-5, atol=1e-7)
        if top_k > 1:
            assert not torch.allclose(routing.gates_TK.sum(-1).double(), torch.ones(T, dtype=torch.float64))


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "cap1.0"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("router", ["softmax", "sigmoid", "norm"])
def test_bias_balancing_changes_selection_not_gates(router, top_k, capacity_factor):
    layer, x = build(seed=2, imbalance=False, router=router, top_k=top_k, bias_balancing=True,
                     capacity_factor=capacity_factor)
    x_TD = x.detach().reshape(-1, D)
    unbiased = layer.router(x_TD)
    bias = torch.tensor([-0.4, 0.5, 0.0, 0.3, -0.2, 0.6, 0.1, -0.5], dtype=torch.float64)
    if router == "norm":  # NormRouter scores are O(c) ~ 2.5, so use a larger bias
        bias = 4 * bias
    layer.router.expert_bias.copy_(bias)
    biased = layer.router(x_TD)

    # selection follows score + bias ...
    logits = x_TD.float() @ layer.router.weight.float().t()
    if router == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif router == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        scores = layer.router.scale * layer.router.norm_constant * torch.relu(logits / (logits.norm(dim=-1, keepdim=True) + 1e-8))
    selection = scores + bias
    if router == "norm":  # only experts the ReLU kept can be picked by their bias
        selection = torch.where(scores == 0, -math.inf, selection)
        positive = (scores > 0).sum(-1)
        active = torch.gather(scores, 1, biased.indices_TK) > 0
        assert torch.equal(active.sum(-1), positive.clamp(max=top_k)), "a biased pick must not waste a slot"
    expected_idx = selection.topk(top_k, dim=-1).indices
    if router == "norm":  # slots beyond a token's positive experts carry no weight, in any order
        expected_idx = torch.where(torch.gather(scores, 1, expected_idx) > 0, expected_idx, -1)
        chosen = torch.where(torch.gather(scores, 1, biased.indices_TK) > 0, biased.indices_TK, -1)
        assert torch.equal(chosen.sort(-1).values, expected_idx.sort(-1).values)
    else:
        assert torch.equal(biased.indices_TK.sort(-1).values, expected_idx.sort(-1).values)
    changed = (biased.indices_TK.sort(-1).values != unbiased.indices_TK.sort(-1).values).any(-1)
    assert changed.sum() >= 3, "the bias must change which experts are selected"
    # ... but the gates are the unbiased scores of the selected experts
    torch.testing.assert_close(biased.gates_TK.double(), torch.gather(scores, 1, biased.indices_TK).double(),
                               rtol=1e-5, atol=1e-7)
    # the balance scores P are unaffected by the bias
    torch.testing.assert_close(biased.scores_TM, unbiased.scores_TM, rtol=0, atol=0)
    # and the whole layer agrees with the reference using biased selection, unbiased gates
    check_against_reference(layer, x)


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "cap1.0"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("phase", ["ramp", "hard"])
@pytest.mark.parametrize("router", ["softmax", "sigmoid", "norm"])
def test_layer_under_unipool_lock_matches_reference(router, phase, bias, capacity_factor):
    """The layer owns the even experts. Ramp: the others' logits (unit vector for NormRouter) are
    lowered by a finite penalty, once, so strong ones are still chosen; hard: they are masked (zeroed
    before the NormRouter's norm), never chosen even with a bias, and capacity counts owned experts."""
    layer, x = build(seed=4, router=router, top_k=2, capacity_factor=capacity_factor, bias_balancing=bias)
    owned = torch.arange(M) % 2 == 0
    lock = PoolLock(layer.config, 1, M)
    lock.owner.copy_(torch.where(owned, 0, 1))
    penalty = math.inf if phase == "hard" else (0.1 if router == "norm" else 0.5)
    lock.offset[0] = torch.where(owned, 0.0, -penalty)
    object.__setattr__(layer, "lock", lock)
    if bias:  # favours foreign experts, which a hard lock must still refuse
        layer.router.expert_bias.copy_(torch.tensor([0.0, 0.3, 0.0, 0.3, 0.0, 0.3, 0.0, 0.3]) * (4 if router == "norm" else 1))
    dropped = check_against_reference(layer, x)
    routing = layer.router(x.detach().reshape(-1, D), lock.logit_offset(0))
    # the z-loss reads the raw logits W h, as without a lock (design note), for every router
    torch.testing.assert_close(routing.logits_TM, torch.nn.functional.linear(
        x.detach().reshape(-1, D).float(), layer.router.weight.float()), rtol=0, atol=0)
    foreign = ~owned[routing.indices_TK[routing.gates_TK > 0]]  # NormRouter slots without weight go nowhere
    if phase == "hard":
        assert not foreign.any()
    else:
        assert foreign.float().mean() > 0.1, "a finite penalty lowers foreign experts, it does not exclude them"
    if capacity_factor is not None:
        assert dropped > 0


@pytest.mark.parametrize(("settings", "names"), [
    ({"aux_loss": "layer", "z_loss_coeff": 0.01}, {"aux_loss", "z_loss"}),
    ({"aux_loss": "pool", "router": "norm", "capacity_factor": 1.0}, {"aux_loss"}),
    ({"aux_loss": "pool", "lock_entropy_coeff": 0.1}, {"aux_loss", "entropy_loss"}),
])
def test_a_layer_given_no_tokens_has_zero_losses_not_nan(settings, names):
    """Every balancing loss is a mean over the layer's tokens: over none it is 0 (it was NaN, and one NaN
    loss makes the step's loss NaN), with zero gradients; the output is empty."""
    layer, x = build(**settings)
    layer.train()
    out, losses = layer(x[:0])
    assert out.shape == (0, S, D) and set(losses) == names
    assert all(loss.item() == 0 for loss in losses.values()), losses
    sum(losses.values()).backward()
    assert all(p.grad is None or not p.grad.any() for p in layer.parameters())


def test_capacity_of_a_hard_locked_layer_counts_its_own_experts():
    """An uneven hard lock (3 and 5 of 8 experts): the second layer's capacity per expert is
    ceil(factor * T * k / 3), from its own experts, not the first layer's 5."""
    layer, x = build(seed=4, router="softmax", top_k=2, capacity_factor=1.0)
    owner = torch.tensor([0, 1, 0, 1, 0, 1, 0, 0])
    lock = PoolLock(layer.config, 2, M)
    lock.owner.copy_(owner)
    lock.offset.copy_(torch.where(owner == torch.arange(2).unsqueeze(1), 0.0, -math.inf))
    object.__setattr__(layer, "lock", lock)
    layer.stats = PoolStats(2, M, "step").double()
    layer.layer_slot = 1
    assert check_against_reference(layer, x) > 0


def test_bias_ignored_without_bias_balancing():
    layer, x = build(seed=3, router="softmax", top_k=2, bias_balancing=False)
    x_TD = x.detach().reshape(-1, D)
    before = layer.router(x_TD).indices_TK.clone()
    layer.router.expert_bias.copy_(torch.linspace(-5, 5, M, dtype=torch.float64))
    assert torch.equal(layer.router(x_TD).indices_TK, before)


def test_capacity_is_exact_for_decimal_factors():
    """ceil(C T k / M) in integers (C = p/q as written): 1.1 * 100 / 11 is exactly 10 slots."""
    from megatron_unipool.moe.router import capacity

    assert capacity(100, 1, 11, 1.1) == 10
    for factor, (p, q) in {0.5: (1, 2), 1.1: (11, 10), 1.25: (5, 4), 1.3: (13, 10), 2.0: (2, 1)}.items():
        for tokens in range(1, 130, 7):
            for top_k in (1, 2):
                for experts in (3, 7, 8, 11, 16):
                    assert capacity(tokens, top_k, experts, factor) == -(-p * tokens * top_k // (q * experts))


def test_plan_dispatch_hand_example():
    # 4 tokens, k=2, 3 experts, capacity 2. Slots in token-then-slot order:
    # s0 (t0) -> e0 keep [e0:1]; s1 (t0) -> e1 keep [e1:1]; s2 (t1) -> e0 keep [e0:2]; s3 (t1) -> e2 keep;
    # s4 (t2) -> e0 DROP (full); s5 (t2) -> e1 keep [e1:2]; s6 (t3) -> e1 DROP; s7 (t3) -> e0 DROP.
    indices = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    plan = plan_dispatch(indices, 3, 2)
    assert plan.dropped == 3
    assert plan.routed_per_expert_M.tolist() == [4, 3, 1]
    assert plan.kept_per_expert_M.tolist() == [2, 2, 1]
    assert sorted(plan.slot_S.tolist()) == [0, 1, 2, 3, 5]
    # grouped by expert, token order within an expert
    assert plan.slot_S.tolist() == [0, 2, 1, 5, 3]
    assert plan.token_S.tolist() == [0, 1, 0, 2, 1]
    dropless = plan_dispatch(indices, 3, None)
    assert dropless.dropped == 0 and dropless.kept_per_expert_M.tolist() == [4, 3, 1]
    assert sorted(dropless.slot_S.tolist()) == list(range(8))


def test_capacity_keeps_earliest_tokens():
    """Every token prefers expert 0 first: with capacity c only the first c tokens get it."""
    layer, x = build(seed=4, imbalance=False, router="softmax", top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 50.0
        x[..., 0] = x[..., 0].abs() + 1.0  # logit of expert 0 dominates for every token
    cap = math.ceil(1.0 * T * 1 / M)  # 3
    out, _ = layer(x)
    x_TD = x.reshape(-1, D)
    expected = torch.zeros(T, D, dtype=torch.float64)
    for t in range(cap):
        expected[t] = ref_expert(layer.pool, 0, x_TD[t])  # gate ~ 1
    torch.testing.assert_close(out.reshape(T, D), expected, rtol=1e-6, atol=1e-6)
    assert int(layer.stats.step_dropped) == T - cap


def test_eval_mode_records_nothing():
    layer, x = build(seed=5, router="sigmoid", top_k=2, capacity_factor=0.5)
    layer.eval()
    out_eval, _ = layer(x)
    assert int(layer.stats.step_counts.sum()) == 0 and int(layer.stats.step_dropped) == 0
    layer.train()
    out_train, _ = layer(x)
    torch.testing.assert_close(out_eval, out_train, rtol=0, atol=0)
    assert int(layer.stats.step_counts.sum()) == T * 2


def test_zero_token_input():
    layer, _ = build(seed=6, router="softmax", top_k=2, shared_expert_ffn_hidden_size=SHARED_F)
    x = torch.zeros(0, 5, D, dtype=torch.float64)
    out, _ = layer(x)
    assert out.shape == x.shape


def test_empty_expert_input_stays_in_the_graph():
    """A rank whose experts receive no tokens must still backpropagate through its (empty) result:
    under expert parallelism the reverse all-to-all needs every rank to take part."""
    pool = ExpertPool(4, D, 8, 0.02, 0.02)
    x = torch.zeros(0, D, requires_grad=True)
    y = pool(x, torch.zeros(4, dtype=torch.long))
    assert y.shape == (0, D) and y.requires_grad


def test_norm_router_zero_gate_slots_neither_dispatched_nor_counted():
    """A token with fewer than k positive NormRouter scores must not spend capacity on zero-gate
    experts: here token 3's only real slot (expert 2) survives capacity 2 although two other
    tokens fill their second slot with a zero-score expert."""
    cfg = MoEConfig(kind="unipool", router="norm", top_k=2, capacity_factor=1.0, aux_loss="none")
    pool = ExpertPool(4, 4, 3, 0.2, 0.2).double()
    layer = MoELayer(cfg, 4, pool, PoolStats(1, 4, "step"), 0, 1, 0.3, 0.2).double()
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4))
    x = torch.tensor([[1.0, -1, -2, -3], [1, -1, -2, -3], [-1, 2, -2, -3], [-1, -1, 3, -3]], dtype=torch.float64)
    layer.train()
    out, _ = layer(x.unsqueeze(0))
    assert torch.equal(layer.stats.micro_batch_counts[0], torch.tensor([2, 1, 1, 0]))
    assert int(layer.stats.step_dropped) == 0
    # f's denominator is every slot (T*k = 8), the 4 without an expert included (design note):
    # renormalised over the 4 routed ones, f_bar would be twice as large
    assert int(layer.stats.micro_batch_slots[0]) == 8
    layer.stats.end_step()
    torch.testing.assert_close(layer.stats.f_bar(), torch.tensor([2, 1, 1, 0]) / 8, check_dtype=False)
    scale = layer.router.scale * layer.router.norm_constant
    with torch.no_grad():
        for t, e in ((0, 0), (1, 0), (2, 1), (3, 2)):  # each token's single positive expert
            gate = scale * x[t, e] / x[t].norm()
            torch.testing.assert_close(out[0, t], gate * ref_expert(pool, e, x[t]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("expert_gemm", ["loop", "grouped_mm"])
def test_dropless_norm_router_computes_weightless_slots_as_exact_zeros(expert_gemm):
    """Dropless, NormRouter slots with gate 0 go to an expert with the others, so the slot count is
    T*k and no MoE layer waits for the device; they change nothing: the output, every gradient and
    the counts equal those of cutting them off (the capacity path, with room for every slot)."""
    import copy

    cfg = MoEConfig(kind="unipool", router="norm", top_k=2, aux_loss="layer", z_loss_coeff=1e-3)
    torch.manual_seed(0)
    pool = ExpertPool(4, 8, 8, 0.2, 0.2, expert_gemm)
    dropless = MoELayer(cfg, 8, pool, PoolStats(1, 4, "step"), 0, 1, 0.3, 0.2)
    cut = copy.deepcopy(dropless)
    cut.config = MoEConfig(**{**cfg.__dict__, "capacity_factor": 100.0})
    object.__setattr__(cut, "pool", copy.deepcopy(pool))
    object.__setattr__(cut, "stats", PoolStats(1, 4, "step"))
    with torch.no_grad():  # an identity router on the first 4 features: most tokens have one positive score
        for layer in (dropless, cut):
            layer.router.weight.copy_(torch.eye(4, 8))
    x = torch.randn(1, 40, 8) - 0.8
    results = []
    for layer in (dropless, cut):
        layer.train()
        x_layer = x.clone().requires_grad_()
        outputs = []

        def step():
            out, losses = layer(x_layer)
            (out.pow(2).sum() + sum(losses.values())).backward()
            outputs.append(out.detach())

        reads = host_syncs(step)
        out = outputs[0]
        grads = [x_layer.grad] + [p.grad for p in (*layer.parameters(), *layer.pool.parameters())]
        results.append((out, grads, layer.stats.micro_batch_counts[0].clone(), reads))
    (out, grads, counts, reads), (out_cut, grads_cut, counts_cut, reads_cut) = results
    gates = dropless.router(x.reshape(-1, 8)).gates_TK
    assert int((gates == 0).sum()) > 10  # the case in question: many weightless slots
    torch.testing.assert_close(out, out_cut, rtol=1e-6, atol=1e-7)
    for grad, grad_cut in zip(grads, grads_cut):
        torch.testing.assert_close(grad, grad_cut, rtol=1e-5, atol=1e-7)
    assert torch.equal(counts, counts_cut) and int(counts.sum()) == int((gates > 0).sum())
    if expert_gemm == "grouped_mm":
        assert reads == [] and reads_cut  # cutting them off reads their count back (and capacity drops)


@pytest.mark.parametrize("offset", [None, "penalty", "masked"])
def test_norm_scores_equal_the_expression_and_its_gradients(offset):
    """NormScores (one autograd node, its backward written out) against the NormRouter expression of the
    design note under autograd: values and both gradients in float64, with a row whose scores are all
    zero (no positive logit), an all-zero row (norm 0, where autograd's norm has gradient 0) and a row of
    norm 1e-9, below the eps; a second derivative is refused, not computed wrong."""
    from megatron_unipool.moe.router import NORM_EPS, NormScores

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(7, M, generator=generator, dtype=torch.float64)
    logits[1] = -logits[1].abs()
    logits[2] = 0.0
    logits[5] *= 1e-9 / logits[5].norm()
    offset_M = {None: None, "penalty": -0.1 * torch.arange(M, dtype=torch.float64) / M,
                "masked": torch.tensor([0.0, -math.inf] * (M // 2), dtype=torch.float64)}[offset]
    if offset == "masked":  # the router zeroes masked experts before the norm
        logits = logits.masked_fill(torch.isneginf(offset_M), 0.0)
    scale, constant = torch.tensor([1.7], dtype=torch.float64), 2.5
    upstream = torch.randn(7, M, generator=generator, dtype=torch.float64)

    def values_and_grads(function):
        z, sigma = logits.clone().requires_grad_(), scale.clone().requires_grad_()
        scores = function(z, sigma)
        return (scores, *torch.autograd.grad((scores * upstream).sum(), (z, sigma)))

    def expression(z, sigma):
        unit = z / (z.norm(dim=-1, keepdim=True) + NORM_EPS)
        return sigma * constant * torch.relu(unit if offset_M is None else unit + offset_M)

    fused = values_and_grads(lambda z, sigma: NormScores.apply(z, sigma, constant, offset_M))
    for name, ours, reference in zip(("scores", "logits' gradient", "scale's gradient"), fused,
                                     values_and_grads(expression)):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-14, msg=lambda m, n=name: f"{n}: {m}")
    assert bool((fused[0][1:3] == 0).all()) and bool((fused[1][2] == 0).all())
    saved = []  # for backward: the unit vectors, two norms per row, sigma * c (and the offset), no more
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        NormScores.apply(logits.clone().requires_grad_(), scale.clone().requires_grad_(), constant, offset_M)
    assert sum(saved) == logits.numel() + 2 * logits.shape[0] + 1 + (0 if offset_M is None else M)
    z = logits[[0, 3, 4]].clone().requires_grad_()  # away from relu's kink: finite differences agree too
    first, = torch.autograd.grad(NormScores.apply(z, scale, constant, offset_M).square().sum(), z, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        first.sum().backward()
    assert torch.autograd.gradcheck(lambda z, sigma: NormScores.apply(z, sigma, constant, offset_M),
                                    (z, scale.clone().requires_grad_()))


@pytest.mark.parametrize("router", ["softmax", "sigmoid", "norm"])
@pytest.mark.parametrize("experts", [8, 12, 24])
def test_ties_go_to_the_lower_expert_index(router, experts):
    """Identical router rows (an upcycled source and its copy) tie on every token: the source takes
    them all. torch.topk split such ties on CPU (43-54% to the copies at these pool sizes)."""
    from megatron_unipool.moe.router import Router

    half = experts // 2
    torch.manual_seed(0)
    router_module = Router(16, experts, MoEConfig(kind="unipool", router=router, top_k=1), 0.5)
    with torch.no_grad():
        router_module.weight[half:] = router_module.weight[:half]
    routing = router_module(torch.randn(2000, 16))
    chosen = routing.indices_TK[:, 0] if routing.active_TK is None else routing.indices_TK[routing.active_TK]
    assert chosen.numel() > 0 and bool((chosen < half).all())


@pytest.mark.parametrize("router", ["softmax", "sigmoid", "norm"])
def test_routing_stays_fp32_under_bf16_autocast(router):
    """bf16 logits (8-bit mantissa) would move near-tied tokens to other experts: the router computes in
    fp32 whatever autocast the caller runs under (docs/design.md), from the bf16 activations it is given."""
    from megatron_unipool.moe.router import Router

    torch.manual_seed(0)
    module = Router(64, 16, MoEConfig(kind="unipool", router=router, top_k=2), 0.02)
    x = torch.randn(256, 64).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routed = module(x)
    plain = module(x)
    assert routed.logits_TM.dtype == routed.gates_TK.dtype == torch.float32
    torch.testing.assert_close(routed.logits_TM, torch.nn.functional.linear(x.float(), module.weight), rtol=0, atol=0)
    assert torch.equal(routed.indices_TK, plain.indices_TK) and torch.equal(routed.gates_TK, plain.gates_TK)


@pytest.mark.parametrize("router", ["softmax", "sigmoid", "norm"])
def test_a_float64_router_still_selects_on_fp32_scores(router, monkeypatch):
    """In a float64 model (as these tests build) the NormRouter scale and the balancing bias are float64;
    the selection scores stay fp32, so top_k_indices orders exactly the values the gates are read from
    (float64 scores 1 and 1 + 1e-12 were rounded to a tie there, which the lower index won)."""
    from megatron_unipool.moe import router as routers

    selected = []
    top_k_indices = routers.top_k_indices
    monkeypatch.setattr(routers, "top_k_indices",
                        lambda scores, k: selected.append(scores.dtype) or top_k_indices(scores, k))
    torch.manual_seed(0)
    module = routers.Router(32, 8, MoEConfig(kind="unipool", router=router, top_k=2, bias_balancing=True), 0.02).double()
    module.expert_bias.copy_(torch.linspace(0, 1e-3, 8, dtype=torch.float64))
    routed = module(torch.randn(64, 32, dtype=torch.float64))
    assert selected == [torch.float32] and routed.gates_TK.dtype == routed.scores_TM.dtype == torch.float32


def test_top_k_indices_equal_a_stable_descending_sort():
    """Ties (many here), -inf (masked experts), +-0 (NormRouter's ReLU) and +inf: the integer key
    ranks exactly as a stable sort, which keeps the lower index first among equal values."""
    from megatron_unipool.moe.router import top_k_indices

    generator = torch.Generator().manual_seed(0)
    for experts in (1, 2, 7, 32, 160):
        x = torch.randint(-3, 4, (400, experts), generator=generator).float() * 0.5
        for value, share in ((float("-inf"), 0.1), (-0.0, 0.1), (float("inf"), 0.05)):
            x[torch.rand(x.shape, generator=generator) < share] = value
        for k in {1, min(2, experts), min(4, experts)}:
            expected = x.sort(dim=-1, descending=True, stable=True).indices[:, :k]
            assert torch.equal(top_k_indices(x, k), expected), (experts, k)
    x = torch.randn(300, 24, generator=generator)
    torch.testing.assert_close(top_k_indices(x, 3), x.topk(3, dim=-1).indices, rtol=0, atol=0)  # no ties: topk's


NO_SYNC_SETTINGS = {  # name: (model settings, moe settings, the CUDA path: rows padded to 8, bf16 autocast)
    "dense": ({}, {"kind": "dense"}, False),
    "vanilla softmax, layer aux, z-loss, shared expert": (
        {}, {"kind": "vanilla", "router": "softmax", "aux_loss": "layer", "z_loss_coeff": 1e-3,
             "shared_expert_ffn_hidden_size": 8}, False),
    "unipool NormRouter, pool aux": ({}, {}, False),
    "unipool, pool aux lagged by a micro-batch, recomputed experts": (
        {"activation_checkpointing": "ffn"}, {"pool_aux_lag": "micro_batch"}, False),
    "unipool, recomputed blocks, per-layer pool gradients": (
        {"activation_checkpointing": "block", "pool_weight_gradients": "per_layer"}, {}, False),
    "unipool sigmoid, aux-loss-free bias": (
        {}, {"router": "sigmoid", "bias_balancing": True, "aux_loss": "none"}, False),
    "unipool-lock annealing, entropy loss": (
        {}, {"lock_start_step": 1, "lock_window_steps": 1, "lock_entropy_coeff": 0.01}, False),
    "unipool-lock hard": ({}, {"lock_start_step": 1, "lock_window_steps": 1, "lock_anneal_steps": 0}, False),
    "unipool, padded rows, bf16": ({}, {}, True),
    "unipool, padded rows, bf16, Triton permute and combine": ({"permute_kernel": "triton"}, {}, True),
}


@pytest.mark.parametrize("name", list(NO_SYNC_SETTINGS))
def test_dropless_training_micro_batch_waits_for_nothing_on_the_host(name, monkeypatch):
    """A dropless model's training micro-batch on the grouped GEMM path (ep 1): forward, backward and the
    micro-batch's routing bookkeeping read no value back to the host and copy none in
    (tests/host_syncs.py). Each such op stalls a GPU once per layer and micro-batch: assigning the
    layer's slot count to an element of a CUDA buffer did, 48 times in a 182M step (docs/benchmarks.md).
    On CUDA every case runs under bf16 autocast (its grouped_mm takes bf16 only); on a CPU the last ones
    take the CUDA path there: each expert's rows padded to 8, bf16, the Triton permute (interpreted)."""
    import torch.nn.functional as F_

    from megatron_unipool.config import ModelConfig
    from megatron_unipool.kernels import grouped_gemm
    from megatron_unipool.kernels.triton_support import triton_runs_on
    from megatron_unipool.model import LanguageModel
    from megatron_unipool.moe import experts

    model_settings, moe_settings, cuda_path = NO_SYNC_SETTINGS[name]
    if model_settings.get("permute_kernel") == "triton" and not triton_runs_on(DEVICE):
        pytest.skip("Triton runs neither compiled (no CUDA) nor interpreted here")
    if cuda_path:
        for module in (grouped_gemm, experts):
            monkeypatch.setattr(module, "expert_row_alignment", lambda *args: 8)
    model_cfg = ModelConfig(num_layers=2, hidden_size=16, num_heads=2, num_kv_heads=1, ffn_hidden_size=32,
                            vocab_size=40, seq_len=8, expert_gemm="grouped_mm", **model_settings)
    moe_cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, **moe_settings})
    torch.manual_seed(0)
    model = LanguageModel(model_cfg, moe_cfg).to(DEVICE)
    tokens = torch.randint(0, 40, (2, 9)).to(DEVICE)
    autocast = cuda_path or DEVICE == "cuda"

    def micro_batch():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            logits, losses = model(tokens[:, :-1])
        assert logits.dtype == (torch.bfloat16 if autocast else torch.float32)
        loss = F_.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        (loss + sum(losses.values(), torch.zeros((), device=DEVICE))).backward()
        model.end_micro_batch()

    micro_batch()  # a first step: the pool loss then has an f_bar, and a UniPool-lock engages
    model.end_lock_step(1, model.end_optimizer_step())
    assert all(not lock.offset.any() for lock in model.pool_locks) == ("lock_start_step" not in moe_settings)
    assert host_syncs(micro_batch) == []
    assert all(p.grad is not None for p in model.parameters())

