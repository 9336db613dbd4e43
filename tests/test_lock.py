"""UniPool-lock: the assignment is optimal (against brute force), the phases follow the config,
after the hard lock every layer routes only to its own experts, and a resumed run continues the
same losses through the lock."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from megatron_unipool.config import ConfigError, MoEConfig
from megatron_unipool.moe.lock import PoolLock, solve_assignment
from megatron_unipool.moe.losses import cardinality_entropy_loss
from megatron_unipool.training import Trainer

pytestmark = pytest.mark.usefixtures("single_thread")

LOCK = ["moe.lock_start_step=3", "moe.lock_window_steps=2", "moe.lock_anneal_steps=2", "moe.lock_penalty=5.0"]


def brute_force_best(mass: np.ndarray) -> float:
    layers, experts = mass.shape
    low, high = experts // layers, math.ceil(experts / layers)
    best = -np.inf
    for owners in itertools.product(range(layers), repeat=experts):
        sizes = np.bincount(owners, minlength=layers)
        if sizes.min() >= low and sizes.max() <= high:
            best = max(best, sum(mass[owner, e] for e, owner in enumerate(owners)))
    return best


@pytest.mark.parametrize("layers,experts", [(2, 4), (3, 6), (3, 7)])
def test_assignment_is_optimal_and_balanced(layers, experts):
    mass = np.random.default_rng(layers * experts).random((layers, experts)) ** 3
    owner = solve_assignment(mass)
    sizes = np.bincount(owner, minlength=layers)
    assert sizes.min() >= experts // layers and sizes.max() <= math.ceil(experts / layers)
    assert sum(mass[o, e] for e, o in enumerate(owner)) == pytest.approx(brute_force_best(mass), rel=1e-9)


@pytest.mark.parametrize("mass", [np.zeros((4, 10)), np.eye(4, 10) * 5], ids=["no mass", "dead experts"])
def test_experts_without_routing_mass_are_still_shared_out_evenly(mass):
    """Dead experts (no tokens in the window) are common: each must still get exactly one owner,
    keeping every layer at floor(M/L) or ceil(M/L) experts."""
    sizes = np.bincount(solve_assignment(mass), minlength=4)
    assert set(sizes.tolist()) <= {2, 3} and sizes.sum() == 10


def test_every_expert_is_usable_until_the_assignment():
    """Before the lock a layer may use the whole pool (bias balancing averages over the usable
    experts: none usable would make its bias NaN); afterwards only its own."""
    config = MoEConfig(kind="unipool", lock_start_step=2, lock_window_steps=1, lock_anneal_steps=1, lock_penalty=1.0)
    lock = PoolLock(config, 2, 4)
    assert lock.usable(0).all() and lock.usable(1).all()
    lock.end_step(1, torch.tensor([[3, 0, 3, 0], [0, 2, 0, 2]]))
    lock.end_step(2, torch.tensor([[3, 0, 3, 0], [0, 2, 0, 2]]))
    assert lock.usable(0).tolist() == [True, False, True, False]
    assert lock.usable(1).tolist() == [False, True, False, True]


def test_phases_follow_the_config():
    config = MoEConfig(kind="unipool", lock_start_step=4, lock_window_steps=2, lock_anneal_steps=3, lock_penalty=6.0)
    lock = PoolLock(config, 2, 4)
    counts = {1: [[9, 9, 9, 9], [9, 9, 9, 9]], 3: [[5, 0, 5, 0], [0, 1, 0, 1]], 4: [[3, 0, 3, 0], [0, 2, 0, 2]],
              5: [[7, 7, 7, 7], [7, 7, 7, 7]]}
    offsets = []
    for step in range(1, 9):
        lock.end_step(step, torch.tensor(counts.get(step, [[0, 0, 0, 0], [0, 0, 0, 0]])))
        offsets.append(lock.logit_offset(1).clone())  # a view of the lock state, which later steps change
    # mass summed over steps 3 and 4 only (window of 2 before the lock at step 4; not 1, not 5)
    assert lock.mass.tolist() == [[8, 0, 8, 0], [0, 3, 0, 3]]
    assert lock.owner.tolist() == [0, 1, 0, 1]
    assert all(offset.tolist() == [0.0, 0.0, 0.0, 0.0] for offset in offsets[:3])  # nothing before the lock
    # the design note's cosine anneal over 3 steps: 6 * (1 - cos(pi t / 3)) / 2 = 1.5, 4.5, 6
    for offset, penalty in zip(offsets[3:6], (1.5, 4.5, 6.0)):
        torch.testing.assert_close(offset, torch.tensor([-penalty, 0.0, -penalty, 0.0]))
    assert offsets[6].tolist() == [-math.inf, 0.0, -math.inf, 0.0]


def test_a_hard_lock_stays_hard_when_the_step_count_starts_over():
    """An upcycled run restarts at step 0 with its source's hard lock: reaching lock_start again must not
    anneal it back to finite penalties (found after upcycling: -inf became -2.5, -7.5, -10)."""
    config = MoEConfig(kind="unipool", lock_start_step=4, lock_window_steps=2, lock_anneal_steps=2, lock_penalty=6.0)
    lock = PoolLock(config, 2, 4)
    for step in range(1, 8):
        lock.end_step(step, torch.tensor([[3, 0, 3, 0], [0, 2, 0, 2]]))
    hard = [[0.0, -math.inf, 0.0, -math.inf], [-math.inf, 0.0, -math.inf, 0.0]]
    assert lock.offset.tolist() == hard
    for step in range(1, 8):  # the continued run
        lock.end_step(step, torch.tensor([[0, 5, 0, 5], [5, 0, 5, 0]]))
        assert lock.offset.tolist() == hard and lock.owner.tolist() == [0, 1, 0, 1]


def test_assignment_waits_for_an_applied_step_when_the_one_at_lock_start_was_skipped():
    """The trainer calls end_step only for applied updates: skipping step 4 must delay the
    assignment to step 5, not leave every expert unowned and so masked for every layer."""
    config = MoEConfig(kind="unipool", lock_start_step=4, lock_window_steps=2, lock_anneal_steps=2, lock_penalty=6.0)
    lock = PoolLock(config, 2, 4)
    for step in (1, 2, 3, 5):  # step 4's update was skipped
        lock.end_step(step, torch.tensor([[3, 0, 3, 0], [0, 2, 0, 2]]))
    assert lock.owner.tolist() == [0, 1, 0, 1]
    assert lock.logit_offset(0).tolist() == [0.0, -6.0, 0.0, -6.0]


def test_entropy_loss_of_the_model_is_the_mean_over_the_pool_layers(tiny_config):
    """coeff * (H_l - log K)^2 / L per layer (design note): the model's total is the layers' mean."""
    config = tiny_config("configs/tiny_unipool_cpu.json", *LOCK, "moe.lock_entropy_coeff=0.01")
    from megatron_unipool.model import LanguageModel

    torch.manual_seed(0)
    model = LanguageModel(config.model, config.moe)
    captured = []
    for layer in model.moe_layers():
        layer.router.register_forward_hook(lambda module, args, routing: captured.append(routing.scores_TM))
    _, losses = model(torch.randint(0, config.model.vocab_size, (2, 16)))
    target = model.expert_pools[0].num_experts / len(captured)
    expected = sum(cardinality_entropy_loss(p, target, 0.01) for p in captured) / len(captured)
    assert len(captured) == 4 and losses["entropy_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_entropy_loss_closed_form():
    scores = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    assert cardinality_entropy_loss(scores, 2.0, 0.1).item() == pytest.approx(0.0, abs=1e-7)
    uniform = torch.full((3, 4), 0.25)
    assert cardinality_entropy_loss(uniform, 2.0, 0.1).item() == pytest.approx(0.1 * math.log(2) ** 2, rel=1e-6)


@pytest.mark.parametrize("router", ["softmax", "norm"])
def test_hard_lock_routes_each_layer_to_its_own_experts_only(tiny_config, tmp_path, router):
    config = tiny_config("configs/tiny_unipool_cpu.json", *LOCK, "train.max_steps=7", "moe.top_k=2",
                         f"moe.router={router}", "moe.lock_entropy_coeff=0.01")
    trainer = Trainer(config, tmp_path)
    for _ in range(7):
        metrics, routing = trainer.train_step()
        assert "entropy_loss" in metrics
    lock = trainer.model.pool_locks[0]
    owner = lock.owner
    assert sorted(torch.bincount(owner, minlength=4).tolist()) == [8, 8, 8, 8]  # 32 experts over 4 layers
    counts = routing.counts_per_pool[0]  # step 7 is after the ramp (steps 3 and 4): hard
    for layer in range(4):
        assert counts[layer][owner != layer].sum() == 0
        assert counts[layer][owner == layer].sum() > 0


def test_bias_balancing_after_the_lock_balances_each_layer_over_its_own_experts(tiny_config, tmp_path):
    """From the step after the assignment (3), a layer's aux-loss-free bias moves only for the
    experts it owns, by rate * sign(mean - count) over those experts; the others keep their bias."""
    rate = 0.01
    config = tiny_config("configs/tiny_unipool_cpu.json", *LOCK, "train.max_steps=7", "moe.top_k=2",
                         "moe.bias_balancing=true", f"moe.bias_update_rate={rate}")
    trainer = Trainer(config, tmp_path)
    routers = [layer.router for layer in trainer.model.moe_layers()]
    for step in range(1, 8):
        before = [router.expert_bias.clone() for router in routers]
        _, routing = trainer.train_step()
        if step <= 3:
            continue
        owner = trainer.model.pool_locks[0].owner
        for slot, router in enumerate(routers):
            own = owner == slot
            counts = routing.counts_per_pool[0][slot].float()
            expected = before[slot].clone()
            expected[own] += rate * torch.sign(counts[own].mean() - counts[own])
            torch.testing.assert_close(router.expert_bias, expected, rtol=0, atol=1e-6)
            moved = (router.expert_bias - before[slot])[own]
            assert (moved > 0).any() and (moved < 0).any(), (step, slot, moved)  # balancing, not a uniform shift


def test_resume_through_the_lock_reproduces_the_run(tiny_config, tmp_path):
    """Saved right after the assignment (step 3), resumed through the ramp (4) into the hard lock (5, 6)."""
    config = tiny_config("configs/tiny_unipool_cpu.json", *LOCK, "train.max_steps=6")
    full = Trainer(config, tmp_path / "full").train()
    interrupted = Trainer(config, tmp_path / "resumed")
    for _ in range(3):
        interrupted.train_step()
    interrupted.save()
    resumed = Trainer(config, tmp_path / "resumed").train()
    assert resumed["train_losses"] == pytest.approx(full["train_losses"][3:], rel=1e-6)


def test_lock_config_errors(tiny_config):
    with pytest.raises(ConfigError, match="needs moe.kind='unipool'"):
        tiny_config("configs/tiny_vanilla_cpu.json", "moe.lock_start_step=5")
    with pytest.raises(ConfigError, match="must not exceed moe.lock_start_step"):
        tiny_config("configs/tiny_unipool_cpu.json", "moe.lock_start_step=5", "moe.lock_window_steps=6")
    with pytest.raises(ConfigError, match="8 of its 32 experts, fewer than moe.top_k=9"):
        tiny_config("configs/tiny_unipool_cpu.json", "moe.lock_start_step=5", "moe.top_k=9")


def test_cardinality_entropy_normalises_the_mean_scores():
    """NormRouter scores do not sum to one: the entropy is that of the mean scores normalised to a
    distribution (closed form), so uniform scores of any size give log M."""
    uniform = torch.full((5, 4), 2.0)
    assert cardinality_entropy_loss(uniform, 4.0, 0.1).item() == pytest.approx(0.0, abs=1e-6)
    scores = torch.tensor([[3.0, 1.0, 0.0, 0.0], [1.0, 1.0, 2.0, 0.0]])
    p = torch.tensor([4.0, 2.0, 2.0, 0.0]) / 8
    entropy = -sum(float(q) * math.log(float(q)) for q in p if q > 0)
    expected = 0.1 * (entropy - math.log(2.0)) ** 2
    assert cardinality_entropy_loss(scores, 2.0, 0.1).item() == pytest.approx(expected, rel=1e-6)

