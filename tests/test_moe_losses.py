"""Balancing losses, pool statistics, aux-loss-free bias and the NormRouter constant on hand-made inputs.

Every expected number is worked out in the comments; the formulas are those of
shared/design/unipool.md (Switch aux loss, pool aux loss with lagged f_bar, z-loss, bias update).
"""
from __future__ import annotations

import math

import pytest
import torch

from megatron_unipool.config import ModelConfig, MoEConfig
from megatron_unipool.model import LanguageModel, RoutingStepStats
from megatron_unipool.moe import (
    ExpertPool,
    MoELayer,
    PoolStats,
    load_balancing_loss,
    norm_router_constant,
    pool_load_fraction,
    z_loss,
)

LN5, LN3, LN2 = math.log(5.0), math.log(3.0), math.log(2.0)


pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------ hand-made 4 tokens x 4 experts

# With the router weight set to the identity (D = M = 4), the logits are the inputs themselves.
# Softmax of [ln5, 0, 0, 0] is [5, 1, 1, 1] / 8.
HAND_LOGITS = torch.tensor(
    [
        [LN5, 0.0, 0.0, 0.0],  # -> expert 0, P = [5,1,1,1]/8
        [0.0, LN5, 0.0, 0.0],  # -> expert 1, P = [1,5,1,1]/8
        [LN5, 0.0, 0.0, 0.0],  # -> expert 0, P = [5,1,1,1]/8
        [0.0, 0.0, 0.0, LN5],  # -> expert 3, P = [1,1,1,5]/8
    ],
    dtype=torch.float64,
)
# top-1 counts [2, 1, 0, 1] -> f = [0.5, 0.25, 0, 0.25]
# mean P = [12, 8, 4, 8] / 32 = [0.375, 0.25, 0.125, 0.25]
HAND_P_MEAN = [0.375, 0.25, 0.125, 0.25]


def hand_layer(stats=None, layer_slot=0, layers_in_pool=1, **overrides):
    settings = {"kind": "unipool", "router": "softmax", "top_k": 1, "aux_loss": "layer", "aux_loss_coeff": 0.01}
    settings.update(overrides)
    cfg = MoEConfig(**settings)
    torch.manual_seed(0)
    pool = ExpertPool(4, 4, 6, 0.1, 0.1)
    stats = stats if stats is not None else PoolStats(layers_in_pool, 4, cfg.pool_aux_lag)
    layer = MoELayer(cfg, 4, pool, stats, layer_slot, layers_in_pool, 0.1, 0.1)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4))
    pool.double()
    layer.double()
    return layer


def test_load_balancing_loss_hand_values():
    scores = torch.tensor(
        [[0.4, 0.3, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.5, 0.1, 0.1, 0.3]],
        dtype=torch.float64,
        requires_grad=True,
    )
    # mean P = [1.25, 1.25, 0.75, 0.75] / 4 = [0.3125, 0.3125, 0.1875, 0.1875]
    f = torch.tensor([0.5, 0.25, 0.25, 0.0], dtype=torch.float64, requires_grad=True)
    # sum f*P = 0.15625 + 0.078125 + 0.046875 + 0 = 0.28125; loss = 0.01 * 4 * 0.28125 = 0.01125
    loss = load_balancing_loss(scores, f, 0.01)
    assert loss.item() == pytest.approx(0.01125, rel=1e-12)
    loss.backward()
    # d loss / d scores[t, i] = coeff * M * f_i / T = 0.01 * f_i; no gradient reaches f
    expected = (0.01 * f.detach()).expand(4, 4)
    torch.testing.assert_close(scores.grad, expected, rtol=1e-12, atol=0)
    assert f.grad is None


def test_load_balancing_loss_uniform_is_coeff():
    # P_i = f_i = 1/M  ->  coeff * M * M * (1/M^2) = coeff
    for m in (1, 3, 8):
        scores = torch.full((5, m), 1.0 / m, dtype=torch.float64)
        assert load_balancing_loss(scores, torch.full((m,), 1.0 / m), 0.02).item() == pytest.approx(0.02)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_layer_aux_loss_hand_softmax(capacity_factor):
    layer = hand_layer(capacity_factor=capacity_factor)
    layer.train()
    _, losses = layer(HAND_LOGITS.view(1, 4, 4))
    # sum f*P = 0.5*0.375 + 0.25*0.25 + 0 + 0.25*0.25 = 0.3125; loss = 0.01 * 4 * 0.3125 = 0.0125.
    # With capacity 1.0: capacity = ceil(1*4*1/4) = 1, so the second token of expert 0 is dropped
    # (1 dropped), but f counts the slots routed before dropping: the loss is the same.
    assert losses["aux_loss"].item() == pytest.approx(0.0125, rel=1e-6)
    assert int(layer.stats.step_dropped) == (0 if capacity_factor is None else 1)
    assert layer.stats.step_counts[0].tolist() == [2, 1, 0, 1]


def test_layer_aux_loss_hand_sigmoid():
    # sigmoid(ln3) = 0.75, sigmoid(0) = 0.5, sigmoid(-ln3) = 0.25
    logits = torch.tensor(
        [
            [LN3, 0.0, 0.0, -LN3],  # s = [.75, .5, .5, .25], sum 2 -> P = [.375, .25, .25, .125]; top-1 = 0
            [-LN3, LN3, -LN3, -LN3],  # s = [.25, .75, .25, .25], sum 1.5 -> P = [1/6, 1/2, 1/6, 1/6]; top-1 = 1
        ],
        dtype=torch.float64,
    )
    layer = hand_layer(router="sigmoid")
    _, losses = layer(logits.view(1, 2, 4))
    # f = [0.5, 0.5, 0, 0]; mean P = [(.375 + 1/6)/2, (.25 + .5)/2, ...] = [13/48, 3/8, ...]
    # sum f*P = 0.5 * 13/48 + 0.5 * 3/8 = 13/96 + 18/96 = 31/96; loss = 0.01 * 4 * 31/96
    assert losses["aux_loss"].item() == pytest.approx(0.04 * 31 / 96, rel=1e-6)


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
@pytest.mark.parametrize("router", ["softmax", "sigmoid", "norm"])
def test_layer_aux_loss_equals_formula_on_its_own_routing(router, capacity_factor):
    """Random layer, k=2: the layer's loss equals coeff*M*sum f_i P_i recomputed from x and W."""
    m, d, k, coeff = 8, 16, 2, 0.03
    cfg = MoEConfig(kind="unipool", router=router, top_k=k, aux_loss="layer", aux_loss_coeff=coeff,
                    z_loss_coeff=1e-3, capacity_factor=capacity_factor)
    torch.manual_seed(1)
    pool = ExpertPool(m, d, 8, 0.1, 0.1)
    layer = MoELayer(cfg, d, pool, PoolStats(1, m, "step"), 0, 1, 0.3, 0.1).double()
    pool.double()
    x = torch.randn(3, 7, d, dtype=torch.float64)
    _, losses = layer(x)
    x_TD = x.reshape(-1, d)
    logits = x_TD.float() @ layer.router.weight.float().t()
    if router == "softmax":
        scores = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
        balance = scores
    elif router == "sigmoid":
        scores = 1 / (1 + torch.exp(-logits))
        balance = scores / scores.sum(-1, keepdim=True)
    else:
        scores = layer.router.scale * layer.router.norm_constant * torch.clamp(
            logits / (logits.pow(2).sum(-1, keepdim=True).sqrt() + 1e-8), min=0)
        balance = scores
    top = scores.topk(k, dim=-1)
    counts = torch.zeros(m, dtype=torch.float64)
    for e, score in zip(top.indices.flatten().tolist(), top.values.flatten().tolist()):
        if router != "norm" or score > 0:  # slots routed before any drop; zero NormRouter gates are not routed
            counts[e] += 1
    f = counts / (x_TD.shape[0] * k)
    expected = coeff * m * (f * balance.double().mean(0)).sum()
    assert losses["aux_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    # z-loss rides along: coeff * mean_t logsumexp(logits_t)^2
    lse = torch.log(torch.exp(logits.double()).sum(-1))
    assert losses["z_loss"].item() == pytest.approx(1e-3 * (lse**2).mean().item(), rel=1e-5)
    # gradient of the aux loss reaches the router (through P only)
    (grad,) = torch.autograd.grad(losses["aux_loss"], layer.router.weight)
    assert grad.abs().sum() > 0


def test_aux_loss_none_and_no_z_loss_by_default():
    layer = hand_layer(aux_loss="none")
    _, losses = layer(HAND_LOGITS.view(1, 4, 4))
    assert losses == {}


@pytest.mark.parametrize("kind", ["vanilla", "unipool", "dense"])
@pytest.mark.parametrize("aux_loss", ["none", "layer", "pool"])
@pytest.mark.parametrize("z_loss_coeff, lock_entropy_coeff", [(0.0, 0.0), (1e-3, 0.0), (0.0, 0.1), (1e-3, 0.1)])
def test_the_config_names_exactly_the_losses_the_model_adds(kind, aux_loss, z_loss_coeff, lock_entropy_coeff):
    """What the trainer logs and sums (MoEConfig.active_losses) against what the layers return."""
    if kind == "vanilla" and aux_loss == "pool":
        pytest.skip("the pool aux loss is UniPool's")
    model = small_model(kind=kind, aux_loss=aux_loss, z_loss_coeff=z_loss_coeff, lock_entropy_coeff=lock_entropy_coeff)
    _, losses = model(torch.randint(0, 40, (2, 8)))
    assert tuple(losses) == model.moe_config.active_losses()


# ------------------------------------------------------------------ pool aux loss and PoolStats


def test_pool_load_fraction_hand():
    counts = torch.tensor([[6, 2, 0, 0], [1, 1, 1, 1]])
    # layer shares [0.75, 0.25, 0, 0] and [0.25]*4 -> mean [0.5, 0.25, 0.125, 0.125]
    torch.testing.assert_close(pool_load_fraction(counts, torch.tensor([8, 4])),
                               torch.tensor([0.5, 0.25, 0.125, 0.125]))
    # slots that reached no expert stay in the denominator (the design note's T*k): a layer whose
    # NormRouter routed 1 of its 100 slots is not counted as a full layer's share
    counts = torch.tensor([[0, 1, 0, 0], [25, 25, 25, 25]])
    torch.testing.assert_close(pool_load_fraction(counts, torch.tensor([100, 100])),
                               torch.tensor([0.125, 0.13, 0.125, 0.125]))


def test_a_step_without_routing_keeps_f_bar_and_an_empty_layer_stays_finite():
    """Nothing routed (every token elsewhere, or no tokens): f_bar keeps the last step's value, and
    a layer with no slots adds zeros to the mean, not 0/0."""
    torch.testing.assert_close(pool_load_fraction(torch.tensor([[0, 0], [2, 2]]), torch.tensor([0, 4])),
                               torch.tensor([0.25, 0.25]))
    stats = PoolStats(2, 2, "step")
    stats.end_step()  # before any routing: still no f_bar (a checkpoint would say so)
    assert not stats.has_load_fraction and torch.equal(stats.f_bar(), torch.zeros(2))
    stats.record(0, torch.tensor([3, 1]), 0, 4)
    stats.record(1, torch.tensor([2, 2]), 0, 4)
    stats.end_step()
    torch.testing.assert_close(stats.f_bar(), torch.tensor([0.625, 0.375]))
    stats.end_step()
    torch.testing.assert_close(stats.f_bar(), torch.tensor([0.625, 0.375]))
    assert stats.has_load_fraction


def test_dropped_routed_and_all_slots_are_summed_over_every_pool():
    """Vanilla: one pool per MoE layer, each with its own drops at capacity factor 0.5."""
    model = small_model(kind="vanilla", pool_size=None, aux_loss="layer", capacity_factor=0.5)
    model(torch.randint(0, 40, (4, 8)))
    dropped = [int(stats.step_dropped) for stats in model.pool_stats]
    routed = [int(stats.step_counts.sum()) for stats in model.pool_stats]
    assert len(dropped) == 2 and all(dropped)
    step = model.end_optimizer_step()
    assert (step.dropped, step.routed, step.slots) == (sum(dropped), sum(routed), 2 * 32 * model.moe_config.top_k)
    assert step.unrouted_fraction() == 0  # softmax routing gives every slot an expert
    assert RoutingStepStats().unrouted_fraction() is None  # no slots: no fraction to report, not 0


def test_pool_aux_step_lag():
    stats = PoolStats(2, 4, "step")
    layer = hand_layer(stats=stats, layer_slot=0, layers_in_pool=2, aux_loss="pool", aux_loss_coeff=0.01)
    x = HAND_LOGITS.view(1, 4, 4)

    # before any completed step: no f_bar, loss exactly 0 (eval and train)
    assert not stats.f_bar().any()
    layer.eval()
    assert layer(x)[1]["aux_loss"].item() == 0.0
    layer.train()
    assert layer(x)[1]["aux_loss"].item() == 0.0
    stats.step_counts.zero_()  # forget the layer's own counts: the step below is made by hand
    stats.step_slots.zero_()
    stats.step_dropped.zero_()

    # one step of two micro-batches, counts by hand:
    # layer 0: [4,0,0,0] + [2,2,0,0] = [6,2,0,0] -> share [.75,.25,0,0]
    # layer 1: [1,0,1,0] + [0,1,0,1] = [1,1,1,1] -> share [.25,.25,.25,.25]
    stats.record(0, torch.tensor([4, 0, 0, 0]), 1, 4)
    stats.record(1, torch.tensor([1, 0, 1, 0]), 0, 2)
    stats.end_micro_batch()
    assert not stats.f_bar().any()  # step lag: a micro-batch boundary does not publish f_bar
    stats.record(0, torch.tensor([2, 2, 0, 0]), 2, 4)
    stats.record(1, torch.tensor([0, 1, 0, 1]), 0, 2)
    counts, slots, dropped = stats.end_step()
    assert counts.tolist() == [[6, 2, 0, 0], [1, 1, 1, 1]] and slots.tolist() == [8, 4]
    assert dropped == 3
    assert int(stats.step_counts.sum()) == 0 and int(stats.step_slots.sum()) == 0 and int(stats.step_dropped) == 0
    f_bar = [0.5, 0.25, 0.125, 0.125]
    torch.testing.assert_close(stats.f_bar().double(), torch.tensor(f_bar, dtype=torch.float64))

    # next step: sum f_bar * P = .5*.375 + .25*.25 + .125*.125 + .125*.25 = 0.296875
    # loss = coeff * M * 0.296875 / L = 0.01 * 4 * 0.296875 / 2 = 0.0059375
    loss = layer(x)[1]["aux_loss"]
    assert loss.item() == pytest.approx(0.0059375, rel=1e-6)
    # counts recorded during this step do not move f_bar until the step ends
    stats.record(1, torch.tensor([0, 0, 8, 0]), 0, 8)
    assert layer(x)[1]["aux_loss"].item() == pytest.approx(0.0059375, rel=1e-6)
    # gradient flows to the router through P, never to f_bar
    (grad,) = torch.autograd.grad(loss, layer.router.weight)
    assert grad.abs().sum() > 0

    # second step: layer 0 this step = the two layer calls above on HAND_LOGITS in train mode
    # ([2,1,0,1] each -> [4,2,0,2], share [.5,.25,0,.25]); layer 1 = [0,0,8,0] -> [0,0,1,0]
    stats.end_step()
    torch.testing.assert_close(stats.f_bar().double(), torch.tensor([0.25, 0.125, 0.5, 0.125], dtype=torch.float64))
    # sum f_bar * P = .25*.375 + .125*.25 + .5*.125 + .125*.25 = 0.21875 -> 0.01*4*0.21875/2 = 0.004375
    assert layer(x)[1]["aux_loss"].item() == pytest.approx(0.004375, rel=1e-6)


def test_pool_aux_micro_batch_lag():
    stats = PoolStats(2, 4, "micro_batch")
    layer = hand_layer(stats=stats, layer_slot=1, layers_in_pool=2, aux_loss="pool", aux_loss_coeff=0.01)
    layer.eval()  # the layer's own counts must not interfere with the hand counts
    x = HAND_LOGITS.view(1, 4, 4)
    assert layer(x)[1]["aux_loss"].item() == 0.0

    # micro-batch 1: layer 0 [3,1,0,0] -> [.75,.25,0,0]; layer 1 [0,0,2,2] -> [0,0,.5,.5]
    stats.record(0, torch.tensor([3, 1, 0, 0]), 0, 4)
    stats.record(1, torch.tensor([0, 0, 2, 2]), 0, 4)
    assert layer(x)[1]["aux_loss"].item() == 0.0  # not published before the micro-batch ends
    stats.end_micro_batch()
    # f_bar = [.375, .125, .25, .25]; sum f_bar*P = .140625 + .03125 + .03125 + .0625 = .265625
    # loss = 0.01 * 4 * .265625 / 2 = 0.0053125
    torch.testing.assert_close(stats.f_bar().double(), torch.tensor([0.375, 0.125, 0.25, 0.25], dtype=torch.float64))
    assert layer(x)[1]["aux_loss"].item() == pytest.approx(0.0053125, rel=1e-6)
    stats.end_step()  # the step boundary does not change a micro-batch-lagged f_bar
    assert layer(x)[1]["aux_loss"].item() == pytest.approx(0.0053125, rel=1e-6)

    # micro-batch 2 uses only its own counts (not the sum with micro-batch 1)
    stats.record(0, torch.tensor([0, 4, 0, 0]), 0, 4)
    stats.record(1, torch.tensor([0, 2, 0, 0]), 0, 2)
    stats.end_micro_batch()
    # f_bar = [0, 1, 0, 0]: loss = 0.01 * 4 * 0.25 / 2 = 0.005
    assert layer(x)[1]["aux_loss"].item() == pytest.approx(0.005, rel=1e-6)


def small_model(**moe_overrides):
    model_cfg = ModelConfig(num_layers=2, hidden_size=16, num_heads=2, num_kv_heads=1, ffn_hidden_size=32,
                            vocab_size=40, seq_len=8)
    settings = {"kind": "unipool", "num_experts": 2, "pool_size": 4, "top_k": 2, "router": "softmax", "aux_loss": "pool",
                    "aux_loss_coeff": 0.01}
    settings.update(moe_overrides)
    torch.manual_seed(0)
    return LanguageModel(model_cfg, MoEConfig(**settings))


def route_counts_and_p(layer, x):
    """Independent routing of a captured MoE input: top-k counts [M] and softmax P [T, M]."""
    x_TD = x.reshape(-1, x.shape[-1])
    logits = x_TD.float() @ layer.router.weight.float().t()
    p = torch.softmax(logits, dim=-1)
    idx = p.topk(layer.config.top_k, dim=-1).indices
    return torch.bincount(idx.flatten(), minlength=p.shape[1]), p


def expected_pool_loss(layers, captured, f_bar, coeff=0.01, num_experts=4):
    total = 0.0
    for i, layer in enumerate(layers):
        _, p = route_counts_and_p(layer, captured[i])
        total += coeff * num_experts * (f_bar * p.double().mean(0)).sum().item() / len(layers)
    return total


@pytest.mark.parametrize("lag", ["step", "micro_batch"])
def test_pool_aux_through_model(lag):
    """f_bar from counts recomputed from each layer's captured input; later losses = formula."""
    model = small_model(pool_aux_lag=lag)
    model.train()
    layers = model.moe_layers()
    captured = {}
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(i, args[0].detach()))
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 40, (2, 8), generator=gen), torch.randint(0, 40, (3, 8), generator=gen)]
    step_counts = torch.zeros(2, 4, dtype=torch.long)
    with torch.no_grad():
        _, losses = model(batches[0])
        assert losses["aux_loss"].item() == 0.0  # no f_bar yet, whatever the lag
        mb1 = torch.stack([route_counts_and_p(layer, captured[i])[0] for i, layer in enumerate(layers)])
        step_counts += mb1
        model.end_micro_batch()

        _, losses = model(batches[1])
        if lag == "step":
            assert losses["aux_loss"].item() == 0.0  # still inside the first optimizer step
        else:  # f_bar = mean over layers of micro-batch 1's shares
            f_bar = (mb1.double() / mb1.sum(-1, keepdim=True)).mean(0)
            assert losses["aux_loss"].item() == pytest.approx(expected_pool_loss(layers, captured, f_bar), rel=1e-5)
        mb2 = torch.stack([route_counts_and_p(layer, captured[i])[0] for i, layer in enumerate(layers)])
        step_counts += mb2
        model.end_micro_batch()

        result = model.end_optimizer_step()
        assert torch.equal(result.counts_per_pool[0], step_counts)
        assert result.dropped == 0
        counts = step_counts if lag == "step" else mb2  # micro_batch lag: the last micro-batch only
        f_bar = (counts.double() / counts.sum(-1, keepdim=True)).mean(0)
        torch.testing.assert_close(model.pool_stats[0].f_bar().double(), f_bar, rtol=1e-6, atol=1e-7)

        _, losses = model(batches[0])
        assert losses["aux_loss"].item() == pytest.approx(expected_pool_loss(layers, captured, f_bar), rel=1e-5)


# ------------------------------------------------------------------ z-loss


def test_z_loss_hand_values():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [LN5, 0.0, 0.0, LN2]], dtype=torch.float64, requires_grad=True)
    # logsumexp: ln(1+1+1+1) = 2 ln2 ; ln(5+1+1+2) = ln 9 = 2 ln3
    # z = coeff * ((2 ln2)^2 + (2 ln3)^2) / 2 = coeff * 2 (ln2^2 + ln3^2)
    value = z_loss(logits, 1e-3)
    assert value.item() == pytest.approx(1e-3 * 2 * (LN2**2 + LN3**2), rel=1e-12)
    value.backward()
    # d/dz_t = coeff * 2 * lse_t * softmax(z_t) / T (T = 2)
    # token 0: 1e-3 * 2 * 2ln2 * 0.25 / 2 = 1e-3 * 0.5 ln2; token 1: 1e-3 * 2 ln3 * [5,1,1,2]/9
    torch.testing.assert_close(logits.grad[0], torch.full((4,), 1e-3 * 0.5 * LN2, dtype=torch.float64))
    torch.testing.assert_close(logits.grad[1], 1e-3 * 2 * LN3 * torch.tensor([5, 1, 1, 2], dtype=torch.float64) / 9)


def test_z_loss_through_layer_hand():
    layer = hand_layer(aux_loss="none", z_loss_coeff=1e-3)
    _, losses = layer(HAND_LOGITS.view(1, 4, 4))
    # every token's logsumexp is ln(5 + 1 + 1 + 1) = ln 8 = 3 ln2 -> z = 1e-3 * 9 ln2^2
    assert losses["z_loss"].item() == pytest.approx(1e-3 * 9 * LN2**2, rel=1e-6)


@pytest.mark.parametrize("name", ["z_loss", "entropy_loss"])
def test_router_losses_train_the_router_with_their_closed_forms_gradient(name):
    """The z-loss (coeff * mean (logsumexp z)^2) and UniPool-lock's entropy loss (coeff * (H(mean p) - log(M / L))^2
    / L) reach the router weight with their closed forms' gradients, not only their values (a detached input
    would log the loss and train nothing)."""
    torch.manual_seed(0)
    hidden, experts, tokens, layers = 8, 4, 6, 2
    cfg = MoEConfig(kind="unipool", router="softmax", top_k=1, aux_loss="none", z_loss_coeff=1e-3,
                    lock_entropy_coeff=5e-3)
    pool = ExpertPool(experts, hidden, 6, 0.1, 0.1)
    layer = MoELayer(cfg, hidden, pool, PoolStats(layers, experts, "step"), 0, layers, 0.5, 0.1).double()
    x = torch.randn(tokens, hidden, dtype=torch.float64)
    _, losses = layer(x)

    def closed_form(weight):
        logits = x @ weight.t()
        if name == "z_loss":
            return 1e-3 * torch.logsumexp(logits, -1).square().mean()
        p = torch.softmax(logits, -1).mean(0)
        return 5e-3 * (-(p * p.log()).sum() - math.log(experts / layers)) ** 2 / layers

    weight = layer.router.weight.detach().clone().requires_grad_()
    expected = closed_form(weight)
    (expected_grad,) = torch.autograd.grad(expected, weight)
    assert losses[name].item() == pytest.approx(expected.item(), rel=1e-6)  # the router's scores are fp32
    assert losses[name].requires_grad
    (grad,) = torch.autograd.grad(losses[name], layer.router.weight)
    assert expected_grad.abs().max() > 0
    torch.testing.assert_close(grad, expected_grad.to(grad.dtype), rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------ aux-loss-free bias


def test_update_bias_hand_counts():
    layer = hand_layer(bias_balancing=True, bias_update_rate=0.01)
    router = layer.router
    router.expert_bias.copy_(torch.tensor([0.1, 0.0, -0.2, 0.05]))
    start = router.expert_bias.clone()
    # counts [2, 4, 6, 4], mean 4 -> sign(mean - c) = [+1, 0, -1, 0]
    router.update_bias(torch.tensor([2, 4, 6, 4]))
    torch.testing.assert_close(router.expert_bias - start,
                               torch.tensor([0.01, 0.0, -0.01, 0.0], dtype=router.expert_bias.dtype), rtol=0, atol=1e-9)


def test_update_bias_balances_among_the_usable_experts_only():
    """UniPool-lock: experts 1 and 3 belong to other layers. Balanced among 0 and 2 (mean 4), the
    bias moves [+r, 0, -r, 0]; counted over all four (mean 2) it would be [0, +r, -r, +r]."""
    layer = hand_layer(bias_balancing=True, bias_update_rate=0.01)
    router = layer.router
    start = router.expert_bias.clone()
    router.update_bias(torch.tensor([2, 0, 6, 0]), torch.tensor([True, False, True, False]))
    torch.testing.assert_close(router.expert_bias - start,
                               torch.tensor([0.01, 0.0, -0.01, 0.0], dtype=router.expert_bias.dtype), rtol=0, atol=1e-9)


def test_bias_update_through_model_sums_micro_batches():
    """Router weights zeroed: scores are uniform, so the top-1 choice is the expert with the largest bias.

    layer 0: bias favours expert 1 in micro-batch 1 (16 tokens) and expert 2 in micro-batch 2 (8
    tokens): step counts [0, 16, 8, 0], mean 6 -> sign [+1, -1, -1, +1]. (Using only the last
    micro-batch, [0, 0, 8, 0], would give +1 for expert 1.)
    layer 1: bias favours expert 0 throughout: counts [24, 0, 0, 0], mean 6 -> [-1, +1, +1, +1].
    """
    rate = 0.01
    model = small_model(top_k=1, aux_loss="none", bias_balancing=True, bias_update_rate=rate)
    model.train()
    layer0, layer1 = model.moe_layers()
    with torch.no_grad():
        for layer in (layer0, layer1):
            layer.router.weight.zero_()
    bias0_mb1 = torch.tensor([0.0, 0.3, 0.1, 0.2])
    bias0_mb2 = torch.tensor([0.0, 0.1, 0.3, 0.2])
    bias1 = torch.tensor([0.4, 0.3, 0.2, 0.1])
    layer1.router.expert_bias.copy_(bias1)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        layer0.router.expert_bias.copy_(bias0_mb1)
        model(torch.randint(0, 40, (2, 8), generator=gen))
        model.end_micro_batch()
        layer0.router.expert_bias.copy_(bias0_mb2)
        model(torch.randint(0, 40, (1, 8), generator=gen))
        model.end_micro_batch()
    result = model.end_optimizer_step()
    assert result.counts_per_pool[0].tolist() == [[0, 16, 8, 0], [24, 0, 0, 0]]
    torch.testing.assert_close(layer0.router.expert_bias, bias0_mb2 + rate * torch.tensor([1.0, -1.0, -1.0, 1.0]),
                               rtol=0, atol=1e-7)
    torch.testing.assert_close(layer1.router.expert_bias, bias1 + rate * torch.tensor([-1.0, 1.0, 1.0, 1.0]),
                               rtol=0, atol=1e-7)
    # an empty step (no forward) leaves every bias where it was (all counts equal the mean 0)
    before = [layer.router.expert_bias.clone() for layer in (layer0, layer1)]
    model.end_optimizer_step()
    for layer, b in zip((layer0, layer1), before):
        assert torch.equal(layer.router.expert_bias, b)


def test_no_bias_update_without_bias_balancing():
    model = small_model(top_k=1, aux_loss="none", bias_balancing=False)
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 40, (2, 8)))
    model.end_optimizer_step()
    for layer in model.moe_layers():
        assert torch.count_nonzero(layer.router.expert_bias) == 0


# ------------------------------------------------------------------ NormRouter constant


@pytest.mark.parametrize("num_experts,expected", [(96, 4.01), (192, 5.16), (288, 6.01), (384, 6.72)])
def test_norm_router_constant_reference_values(num_experts, expected):
    assert norm_router_constant(num_experts, 1) == pytest.approx(expected, abs=0.02)


def test_norm_router_constant_small_pools_finite():
    assert norm_router_constant(1, 1) == 1.0  # x/|x| = +-1: every kept sample has top-1 norm exactly 1
    for m in (1, 2, 4):
        for k in range(1, m + 1):
            c = norm_router_constant(m, k)
            # the selected entries of a unit vector have norm <= 1, so c >= 1
            assert math.isfinite(c) and c >= 1.0, (m, k, c)


def test_norm_router_constant_falls_back_to_one_when_no_draw_has_a_positive_entry():
    """Draws without a positive entry are dropped; with none left, c is 1 (not 0, which would zero every
    NormRouter gate, nor NaN). One draw of a 1-expert pool, from the generator the estimate uses: a seed
    whose draw is negative leaves nothing, one whose draw is positive gives 1/|x/|x|| = 1 itself."""
    def draw(seed):
        return torch.randn(1, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).item()

    negative = next(seed for seed in range(100) if draw(seed) < 0)
    positive = next(seed for seed in range(100) if draw(seed) > 0)
    assert norm_router_constant(1, 1, samples=1, seed=negative) == 1.0
    assert norm_router_constant(1, 1, samples=1, seed=positive) == 1.0


@pytest.mark.parametrize("num_experts", [2, 4])
def test_norm_router_constant_is_stable_over_seeds_for_small_pools(num_experts):
    """1/||top-k|| has a divergent tail for small M: the plain mean swings from 4.4 to 75 over six
    seeds at M=4; trimming the largest 0.1% of draws keeps the estimate within 0.3."""
    estimates = [norm_router_constant(num_experts, 1, seed=seed) for seed in range(6)]
    assert max(estimates) - min(estimates) < 0.3, estimates


def test_norm_router_constant_independent_estimate():
    """M=16 (no heavy tail to speak of): own Monte Carlo estimate, k=1 and k=3."""
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(200_000, 16, generator=gen, dtype=torch.float64)
    y = torch.clamp(x / x.norm(dim=-1, keepdim=True), min=0)
    for k in (1, 3):
        top = torch.sort(y, dim=-1, descending=True).values[:, :k]
        n = top.pow(2).sum(-1).sqrt()
        own = (1 / n[n > 0]).mean().item()
        assert norm_router_constant(16, k) == pytest.approx(own, rel=0.02)
    assert norm_router_constant(16, 1) > norm_router_constant(16, 3)


def test_norm_router_uses_constant_and_explicit_override():
    cfg = MoEConfig(kind="unipool", router="norm", top_k=2)
    pool = ExpertPool(8, 4, 4, 0.1, 0.1)
    layer = MoELayer(cfg, 4, pool, PoolStats(1, 8, "step"), 0, 1, 0.1, 0.1)
    assert layer.router.norm_constant == pytest.approx(norm_router_constant(8, 2))
    cfg = MoEConfig(kind="unipool", router="norm", top_k=2, norm_router_c=3.5)
    layer = MoELayer(cfg, 4, pool, PoolStats(1, 8, "step"), 0, 1, 0.1, 0.1)
    assert layer.router.norm_constant == 3.5
    assert layer.router.scale.item() == 1.0
