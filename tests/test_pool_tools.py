"""The pool tools of tools/: expert upcycling (exact function preservation where it must hold, the
measured gap where it cannot, utility-based replicas, optimizer-state copies, dense -> MoE, tool +
launcher round trip), the routing probe and the utilisation analysis."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_unipool.config import config_from_dict, config_to_dict, load_config
from megatron_unipool.model import LanguageModel
from megatron_unipool.training import Trainer, build_datasets, load_checkpoint, resolve_checkpoint
from megatron_unipool.training.upcycling import (MAX_EXTRA, expert_utility, replica_sources, upcycle, upcycle_dense,
                                                 utility_batches)

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=128",
         "model.seq_len=32", "train.global_batch=8", "train.micro_batch=4", "train.warmup_steps=2",
         "train.eval_batches=4", "train.eval_interval=0", "logging.tensorboard=false", "checkpoint.save_interval=0",
         "checkpoint.resume=false", "train.lr=0.003"]

pytestmark = pytest.mark.usefixtures("single_thread")


def small_config(data_cache, kind="unipool", *overrides):
    return load_config(REPO / f"configs/tiny_{kind}_cpu.json", SMALL + [f"data.cache_dir={data_cache}", *overrides])


def model_from(config, state):
    model = LanguageModel(config.model, config.moe)
    model.load_state_dict(state)
    return model.eval()


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
        "vanilla_top1": ("vanilla", ["moe.router=softmax", "moe.softmax_before_topk=false", "moe.top_k=1"]),
        "softmax_top2": ("unipool", ["moe.router=softmax", "moe.top_k=2"]),
    }
    out = {}
    for name, (kind, overrides) in runs.items():
        config = small_config(data_cache, kind, "train.max_steps=30", *overrides)
        run_dir = tmp_path_factory.mktemp(name)
        Trainer(config, run_dir, device=torch.device("cpu")).train()
        out[name] = (config, load_checkpoint(resolve_checkpoint(run_dir)), run_dir)
    return out


@pytest.mark.parametrize("name", ["softmax_top1", "norm_top1", "vanilla_top1"])
def test_uniform_top1_upcycling_keeps_the_function(trained, name):
    config, payload, _ = trained[name]
    result = upcycle(config, payload["model"], payload["optimizer"], multiplier=2, noise=0.0)
    assert result.config.moe.experts_per_pool(config.model.num_layers) == 2 * config.moe.experts_per_pool(
        config.model.num_layers)
    batch = tokens(config)
    source, grown = model_from(config, payload["model"]), model_from(result.config, result.model_state)
    with torch.no_grad():
        expected, actual = source(batch[:, :-1])[0], grown(batch[:, :-1])[0]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


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
    assert sources[:5] == [0, 1, 2, 3, 4]
    copies = [sources.count(e) for e in range(5)]
    assert copies == [1, 1 + MAX_EXTRA, 1, 1, 1 + 2]  # 5 extra: 3 to the best, the remaining 2 to the second
    assert replica_sources(3, multiplier=3) == [0, 1, 2, 0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="multiplier can be at most 4"):
        replica_sources(4, multiplier=5, utility=torch.ones(4))


@pytest.mark.parametrize("score", ["grad_sq", "weight_x_grad"])
def test_expert_utility_matches_the_gradient_it_names(trained, score):
    config, payload, _ = trained["softmax_top2"]
    model = model_from(config, payload["model"])
    batches = utility_batches(config, 2, 2)
    utility = expert_utility(model, batches, score)[0]
    expected = torch.zeros_like(utility)
    pool = model.expert_pools[0]
    for batch in batches:
        logits, _ = model(batch[:, :-1])
        grads = torch.autograd.grad(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()),
                                    [pool.w_gate, pool.w_up, pool.w_down])
        grad_sq = sum(g.double().flatten(1).pow(2).sum(1) for g in grads)
        weight = sum(w.detach().double().flatten(1).pow(2).sum(1) for w in (pool.w_gate, pool.w_up, pool.w_down)).sqrt()
        expected += grad_sq if score == "grad_sq" else weight * grad_sq.sqrt()
    torch.testing.assert_close(utility, expected / len(batches), rtol=1e-6, atol=0)
    assert (utility > 0).any()


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
    batch = tokens(dense)
    with torch.no_grad():
        expected = model_from(dense, dense_state)(batch[:, :-1])[0]
        actual = model_from(result.config, result.model_state)(batch[:, :-1])[0]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    mismatched = small_config(data_cache, "vanilla", "moe.expert_ffn_hidden_size=64")
    with pytest.raises(ValueError, match="expert width 64 must equal the dense FFN width 128"):
        upcycle_dense(dense, dense_state, mismatched)


@pytest.mark.parametrize("overrides, message", [
    (["model.rope_base=50000"], "model.rope_base: dense 10000.0 vs target 50000.0"),
    (["model.norm_eps=0.01"], "model.norm_eps: dense 1e-05 vs target 0.01"),
    # layers 0 and 2 stay dense and copy the dense FFNs, so their width must match too
    (["moe.moe_layer_interval=2", "model.ffn_hidden_size=256", "moe.expert_ffn_hidden_size=128"],
     "model.ffn_hidden_size: dense 128 vs target 256"),
])
def test_dense_upcycling_refuses_a_target_computing_another_function(data_cache, overrides, message):
    dense = small_config(data_cache, "dense")
    dense_state = LanguageModel(dense.model, dense.moe).state_dict()
    target = small_config(data_cache, "vanilla", "moe.expert_ffn_hidden_size=128", *overrides)
    with pytest.raises(ValueError, match=message):
        upcycle_dense(dense, dense_state, target)
    longer = small_config(data_cache, "vanilla", "moe.expert_ffn_hidden_size=128", "model.seq_len=64")
    upcycle_dense(dense, dense_state, longer)  # RoPE depends on the position alone: a longer context is fine


def test_tool_refuses_no_utility_batches(tmp_path):
    for count in ("0", "-2"):  # the utility is a mean over the batches: none gave NaN scores
        done = subprocess.run([sys.executable, str(REPO / "tools" / "upcycle.py"), "--checkpoint", str(tmp_path),
                               "--selection", "utility", "--utility-batches", count, "--output", str(tmp_path / "out")],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and f"--utility-batches must be at least 1, not {count}" in done.stderr
        assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_tool_output_continues_with_the_launcher(trained, tmp_path):
    config, payload, run_dir = trained["softmax_top2"]
    out = tmp_path / "upcycled"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "upcycle.py"), "--checkpoint", str(run_dir),
                           "--multiplier", "2", "--selection", "utility", "--utility-batches", "2", "--output", str(out),
                           "--set", "train.max_steps=2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "continue with" in done.stdout
    written = config_from_dict(json.loads((out / "config.json").read_text()), world_size=None)
    assert written.moe.pool_size == 2 * config.moe.experts_per_pool(config.model.num_layers)
    done = subprocess.run([sys.executable, str(REPO / "launch" / "pretrain.py"), "--config", str(out / "config.json"),
                           "--run-dir", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and all(loss == loss for loss in summary["train_losses"])
    assert summary["consumed_samples"] == payload["train_state"]["consumed_samples"] + 2 * config.train.global_batch
    # the first step trains the upcycled weights: its loss is the source model's, not a fresh model's
    assert summary["train_losses"][0] < payload["train_state"]["train_losses"][0] - 0.5
    again = subprocess.run([sys.executable, str(REPO / "tools" / "upcycle.py"), "--checkpoint", str(run_dir),
                            "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already holds a checkpoint" in again.stderr
    assert config_to_dict(written)["model"] == config_to_dict(config)["model"]


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
    torch.testing.assert_close(routing.gates_TK.sum(-1), learned.gates_TK.sum(-1))


def test_probe_tool_reports_each_layer(trained, tmp_path):
    config, payload, run_dir = trained["softmax_top2"]
    out = tmp_path / "probe"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "routing_probe.py"), "--checkpoint", str(run_dir),
                           "--layers", "all", "--top-n", "4", "--output", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "probe.json").read_text())
    # the learned routing's loss is the run's own final validation loss (same batches)
    assert report["baseline"] == pytest.approx(payload["train_state"]["val_losses"][-1][1], rel=1e-5)
    assert sorted((r["layer"], r["candidates"]) for r in report["rows"]) == sorted(
        (layer, name) for layer in range(4) for name in ("pool", "top4"))
    assert sum(r["delta"] for r in report["rows"] if r["candidates"] == "pool") > 0  # random routing hurts on average
    assert (out / "probe.png").stat().st_size > 0
    bad = subprocess.run([sys.executable, str(REPO / "tools" / "routing_probe.py"), "--checkpoint", str(run_dir),
                          "--layers", "7"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "are not MoE layers" in bad.stderr


def test_unique_experts_by_depth_closed_form():
    from megatron_unipool.training.probe import unique_experts_by_depth

    routing = {0: torch.tensor([[0, 1], [2, 3]]), 1: torch.tensor([[1, 2], [2, -1]]), 3: torch.tensor([[0, 3], [5, 6]])}
    shared = unique_experts_by_depth(routing, {0: 0, 1: 0, 3: 0}, 8)
    assert shared == [2.0, 2.5, 4.0]  # token 0: {0,1} {0,1,2} {0,1,2,3}; token 1: {2,3} {2,3} {2,3,5,6}
    per_layer = unique_experts_by_depth(routing, {0: 0, 1: 1, 3: 2}, 8)
    assert per_layer == [2.0, 3.5, 5.5]  # separate pools: every pick is a new expert


def test_utilisation_tool_counts_every_routed_slot(trained, tmp_path):
    config, payload, run_dir = trained["softmax_top2"]
    out = tmp_path / "util"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "plot_utilisation.py"), "--checkpoint", str(run_dir),
                           "--eval-batches", "2", "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "utilisation.json").read_text())
    tokens = 2 * config.train.micro_batch * config.model.seq_len
    counts = torch.tensor(report["counts_per_pool"][0])
    assert counts.shape == (4, 32) and (counts.sum(1) == tokens * 2).all()  # top-2, dropless, every layer
    curve = report["unique_experts_by_depth"]
    assert curve[0] == 2.0 and all(a <= b <= a + 2 for a, b in zip(curve, curve[1:]))
    assert (out / "utilisation.png").stat().st_size > 0 and (out / "unique_experts.png").stat().st_size > 0


def test_reproduction_tool_aggregates_seeds_and_resumes(data_cache, tmp_path):
    out = tmp_path / "repro"
    command = [sys.executable, str(REPO / "tools" / "reproduce.py"), "--seeds", "1", "2", "--models", "vanilla", "unipool",
               "--output", str(out)] + [item for o in SMALL + ["train.max_steps=3", f"data.cache_dir={data_cache}"]
                                        for item in ("--set", o)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"vanilla", "unipool"} and all(len(runs) == 2 for runs in results.values())
    seeds = [json.loads((out / "unipool" / f"seed{s}" / "summary.json").read_text())["final_val_loss"] for s in (1, 2)]
    assert seeds[0] != seeds[1]  # different seeds, different runs
    assert f"{sum(seeds) / 2:.4f}" in (out / "results.md").read_text()
    assert "unipool below vanilla" in (out / "results.md").read_text()
    assert (out / "curves.png").stat().st_size > 0
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)  # every run is done: nothing retrained
    assert again.returncode == 0 and json.loads((out / "results.json").read_text()) == results
