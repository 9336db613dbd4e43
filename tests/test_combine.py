"""The MoE combine's Triton kernels (kernels/combine.py; interpreted on a CPU) against the eager
combine of moe/dispatch.py: top-1 and top-2, dropless and with slots dropped over capacity, zero
gates (NormRouter), fp32 and bf16, and in whole models."""
from __future__ import annotations

import pytest
import torch

from megatron_unipool.kernels import KernelUnavailableError
from megatron_unipool.moe.dispatch import plan_dispatch, unpermute
from kernel_models import assert_triton_model_equals_torch_model

pytestmark = pytest.mark.usefixtures("single_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def combined_and_gradients(kernel, y_SD, gates_TK, plan, num_tokens):
    y, gates = y_SD.clone().requires_grad_(), gates_TK.clone().requires_grad_()
    out = unpermute(y, gates, plan, num_tokens, kernel)
    weights = torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)
    (out.float() * weights).sum().backward()
    return out.detach().float(), y.grad.float(), gates.grad.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("top_k, capacity", [(1, None), (2, None), (2, 3)], ids=["top1", "top2", "top2_drops"])
def test_kernel_combine_equals_the_eager_one(dtype, top_k, capacity, triton_runs):
    """300 hidden columns: two column blocks, the second partly masked."""
    generator = torch.Generator().manual_seed(0)
    tokens, experts, hidden = 21, 4, 300
    indices = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)]).to(DEVICE)
    gates = torch.rand(tokens, top_k, generator=generator).to(DEVICE)
    gates[3, 0] = 0.0  # a NormRouter slot without an expert: computed, weightless
    plan = plan_dispatch(indices, experts, capacity)
    assert (plan.dropped > 0) == (capacity is not None)
    y = torch.randn(plan.token_S.numel(), hidden, generator=generator).to(DEVICE, dtype)
    expected = combined_and_gradients("torch", y, gates, plan, tokens)
    actual = combined_and_gradients("triton", y, gates, plan, tokens)
    # the eager combine rounds each weighted row to y's dtype before summing; the kernel sums in fp32
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for name, a, e in zip(["out", "grad y", "grad gates"], actual, expected):
        torch.testing.assert_close(a, e, **tolerance, msg=name)


@pytest.mark.parametrize("config", ["configs/tiny_vanilla_cpu.json", "configs/tiny_unipool_cpu.json"])
def test_model_with_the_kernel_equals_the_torch_model(config, tiny_config, triton_runs, monkeypatch):
    """model.combine_kernel reaches every MoE layer: one kernel launch each way per layer."""
    from megatron_unipool.moe import dispatch

    launches = []
    for name in ("combine_forward", "combine_backward"):
        kernel = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda *a, kernel=kernel, name=name: launches.append(name) or kernel(*a))

    def launched_once_each_way_per_layer(model, kernel):
        moe_layers = len(model.moe_layers()) if kernel == "triton" else 0
        assert sorted(launches) == ["combine_backward"] * moe_layers + ["combine_forward"] * moe_layers
        launches.clear()

    assert_triton_model_equals_torch_model(tiny_config(config, "moe.top_k=2"), "combine_kernel", DEVICE,
                                           launched_once_each_way_per_layer)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU")
def test_triton_without_cuda_or_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    plan = plan_dispatch(torch.tensor([[0], [1]]), 2, None)
    with pytest.raises(KernelUnavailableError, match="model.combine_kernel='triton'"):
        unpermute(torch.zeros(2, 4), torch.ones(2, 1), plan, 2, "triton")
