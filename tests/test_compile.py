"""model.compile: the blocks' torch.compile graphs against the eager blocks they replace."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from megatron_unipool.config import MoEConfig, load_config
from megatron_unipool.model import LanguageModel
from megatron_unipool.moe.router import Router

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {kind: REPO / f"configs/tiny_{kind}_cpu.json" for kind in ("dense", "vanilla", "unipool")}


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles from scratch: graphs left by another test would hide a recompilation or a graph
    break, and dynamo's per-function cache limit would eventually send a test back to eager code unnoticed."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # graphs and graph breaks, which reset() leaves counted
    yield
    torch._dynamo.reset()


def twin_models(kind: str, overrides: list[str]) -> tuple[LanguageModel, LanguageModel]:
    """The same model eager and compiled, with the same initial weights."""
    base = ["logging.tensorboard=false", "model.seq_len=32", "model.hidden_size=64", "model.ffn_hidden_size=128"]
    models = []
    for compiled in (False, True):
        config = load_config(CONFIGS[kind], base + overrides + [f"model.compile={str(compiled).lower()}"])
        torch.manual_seed(0)
        models.append(LanguageModel(config.model, config.moe))
    return models[0], models[1]


def loss_and_gradients(model: LanguageModel, tokens: torch.Tensor, dtype: torch.dtype):
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        logits, moe_losses = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()) + sum(moe_losses.values())
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind, checkpointing, dtype", [
    ("unipool", "none", torch.float32), ("vanilla", "attention", torch.float32), ("dense", "ffn", torch.float32),
    ("unipool", "block", torch.float32), ("dense", "none", torch.bfloat16), ("unipool", "none", torch.bfloat16),
])
def test_compiled_blocks_compute_the_eager_losses_and_gradients(kind, checkpointing, dtype):
    """One forward and backward through every block, compiled against eager, with each recomputation
    setting; and one graph per compiled part serving all four blocks (a graph per block would multiply
    the compile time by the depth and, past dynamo's cache limit of 8, silently run the rest eagerly)."""
    eager, compiled = twin_models(kind, [f"model.activation_checkpointing={checkpointing}"])
    tokens = torch.randint(0, eager.config.vocab_size, (2, eager.config.seq_len + 1), generator=torch.Generator().manual_seed(1))
    expected_loss, expected = loss_and_gradients(eager, tokens, dtype)
    loss, grads = loss_and_gradients(compiled, tokens, dtype)
    # the attention sublayer, the FFN's part (its norm, or the dense FFN), and an MoE layer's router
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == (2 if kind == "dense" else 3)
    assert not torch._dynamo.utils.counters["graph_break"]
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(loss, expected_loss, **tolerance)
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
        # relative to the whole tensor: bf16 roundings fall in different places in fused and unfused code
        error = float((grads[name] - grad).norm() / grad.norm().clamp_min(1e-30))
        assert error < (1e-5 if dtype == torch.float32 else 2e-2), f"{name}: relative error {error:.2e}"


def test_a_compiled_model_keeps_the_eager_state_dict_and_its_copies_share_the_graphs():
    """Compiling changes no parameter name (checkpoints load either way), and a copy of a compiled model,
    as upcycling and the tools make, runs on the graphs already compiled."""
    eager, compiled = twin_models("unipool", [])
    assert list(compiled.state_dict()) == list(eager.state_dict())
    tokens = torch.randint(0, eager.config.vocab_size, (2, eager.config.seq_len + 1), generator=torch.Generator().manual_seed(2))
    loss_and_gradients(compiled, tokens, torch.float32)
    twin = copy.deepcopy(compiled)
    with torch._dynamo.config.patch(error_on_recompile=True):
        loss, _ = loss_and_gradients(twin, tokens, torch.float32)
    expected, _ = loss_and_gradients(eager, tokens, torch.float32)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("router_config", [
    dict(router="softmax", top_k=2), dict(router="softmax", top_k=2, softmax_before_topk=False),
    dict(router="sigmoid", top_k=2, normalize_gates=True), dict(router="norm", top_k=2, bias_balancing=True),
    dict(router="norm", top_k=1, offsets=True), dict(router="softmax", top_k=2, bias_balancing=True, offsets=True),
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_the_compiled_router_selects_as_the_eager_one(router_config):
    """The fused router (model.compile): the same experts, gates, scores and gradients as eager code for every
    scoring, with the aux-loss-free bias and with UniPool-lock's offsets (a penalty and a removed expert)."""
    config = dict(router_config)
    offsets = config.pop("offsets", False)
    generator = torch.Generator().manual_seed(3)
    routers = []
    for compiled in (False, True):
        torch.manual_seed(0)
        router = Router(16, 8, MoEConfig(kind="unipool", **config), 0.5, compile=compiled)
        router.expert_bias.copy_(torch.linspace(-0.05, 0.05, 8))
        routers.append(router)
    offset_M = torch.tensor([0.0, -0.5, float("-inf"), 0, 0, -0.2, 0, 0]) if offsets else None
    x = torch.randn(64, 16, generator=generator)
    results = []
    for router in routers:
        inputs = x.clone().requires_grad_(True)
        routing = router(inputs, offset_M)
        (routing.gates_TK.square().sum() + routing.scores_TM.mean(0).square().sum() + routing.logits_TM.sum()).backward()
        results.append((routing, inputs.grad, {name: p.grad for name, p in router.named_parameters()}))
    (eager, eager_x_grad, eager_grads), (compiled, x_grad, grads) = results
    assert torch.equal(compiled.indices_TK, eager.indices_TK)
    for field in ("gates_TK", "scores_TM", "logits_TM"):
        torch.testing.assert_close(getattr(compiled, field), getattr(eager, field), rtol=1e-5, atol=1e-6)
    assert (compiled.active_TK is None) == (eager.active_TK is None)
    if eager.active_TK is not None:
        assert torch.equal(compiled.active_TK, eager.active_TK)
    torch.testing.assert_close(x_grad, eager_x_grad, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
