"""The MoE permute and combine in Triton (kernels/permute.py; interpreted on a CPU) against the eager
ones of moe/dispatch.py: the padded layout they share with the expert GEMM, each direction's numbers and
gradients (top-1 and top-2, dropless and with slots dropped over capacity, zero gates, fp32 and bf16,
rows padded or not), and whole models."""
from __future__ import annotations

import contextlib

import pytest
import torch

from megatron_unipool.kernels import KernelUnavailableError
from megatron_unipool.moe.dispatch import expert_rows, permute, plan_dispatch, unpermute
from kernel_models import DEVICE, RecordedLaunches, assert_triton_model_equals_torch_model

pytestmark = pytest.mark.usefixtures("single_thread")


def routed(tokens: int, experts: int, top_k: int, capacity: int | None, seed: int = 0):
    """Random distinct experts per token, gates in (0, 1) with one zero (a NormRouter slot without an
    expert: computed, weightless); the dispatch plan."""
    generator = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)]).to(DEVICE)
    gates = torch.rand(tokens, top_k, generator=generator).to(DEVICE)
    gates[3, 0] = 0.0
    return indices, gates, plan_dispatch(indices, experts, capacity)


@pytest.mark.parametrize("align", [1, 8])
@pytest.mark.parametrize("top_k, capacity", [(1, None), (2, None), (2, 3)], ids=["top1", "top2", "top2_drops"])
def test_expert_rows_pad_each_experts_slice_to_the_alignment(align, top_k, capacity):
    """Against a layout built slot by slot: experts in order, each one's kept slots in the plan's order
    from a multiple of `align`, the rest padding; every kept (token, slot) finds its row, dropped ones -1."""
    tokens, experts = 21, 5
    indices, _, plan = routed(tokens, experts, top_k, capacity)
    rows = expert_rows(plan, tokens, top_k, align)
    kept = plan.kept_per_expert_M.tolist()
    expected_slot_P, expected_row = [], {}
    start = 0
    for count in kept:
        for slot in plan.slot_S[start: start + count].tolist():
            expected_row[slot] = len(expected_slot_P)
            expected_slot_P.append(slot)
        start += count
        expected_slot_P += [-1] * (-count % align)
    expected_slot_P += [-1] * (plan.slot_S.numel() + experts * (align - 1) - len(expected_slot_P))
    assert rows.slot_P.tolist() == expected_slot_P
    assert rows.counts_M.tolist() == [count + -count % align for count in kept]
    assert rows.row_TK.flatten().tolist() == [expected_row.get(slot, -1) for slot in range(tokens * top_k)]
    assert (indices.flatten()[rows.slot_P[rows.slot_P >= 0]] == torch.repeat_interleave(
        torch.arange(experts, device=DEVICE), plan.kept_per_expert_M)).all()  # each row in its expert's slice


def test_the_eager_combine_takes_the_gates_gradient_as_an_fp32_dot_of_bf16_rows():
    """d(out[t])/d(gate of slot s) = <grad_out[t], y[s]>, summed in fp32 over D = 1024 bf16 products: a bf16
    sum rounds it by about 0.2-1% (the router's gradient), where fp32 stays near the fp64 dot of the same values."""
    generator = torch.Generator().manual_seed(0)
    tokens, experts, top_k, hidden = 64, 4, 2, 1024
    _, gates, plan = routed(tokens, experts, top_k, None)
    y = torch.randn(tokens * top_k, hidden, generator=generator).bfloat16().to(DEVICE)
    grad_out = torch.randn(tokens, hidden, generator=generator).bfloat16().to(DEVICE)
    gates.requires_grad_()
    unpermute(y, gates, plan, tokens).backward(grad_out)
    expected = torch.zeros(tokens * top_k, dtype=torch.float64, device=DEVICE)
    expected[plan.slot_S] = (grad_out.double()[plan.token_S] * y.double()).sum(-1)
    error = (gates.grad.double().flatten() - expected).abs() / expected.abs().clamp_min(1e-3)
    assert error.median() < 1e-6 and error.max() < 1e-3, (error.median(), error.max())


def test_the_combine_kernel_rounds_each_tokens_bf16_sum_once(triton_runs):
    """Top-4 bf16 rows: each token's weighted rows summed in fp32 and rounded to bf16 once (rounding after each
    row moves most outputs by an ulp or more). The interpreter's fp32 -> bf16 cast truncates; CUDA's rounds."""
    from megatron_unipool.kernels.triton_support import interpreting

    generator = torch.Generator().manual_seed(1)
    tokens, experts, top_k, hidden = 64, 8, 4, 96
    _, gates, plan = routed(tokens, experts, top_k, None)
    rows = expert_rows(plan, tokens, top_k, 1)
    y = torch.randn(rows.slot_P.numel(), hidden, generator=generator).bfloat16().to(DEVICE)
    out = unpermute(y, gates, plan, tokens, rows)
    assert out.dtype == torch.bfloat16
    total = (gates.double()[..., None] * y.double()[rows.row_TK.clamp_min(0)]).sum(1).float()
    expected = (total.view(torch.int32) & -65536).view(torch.float32) if interpreting() else total.bfloat16().float()
    differing = (out.float() != expected).sum().item()
    assert differing <= out.numel() // 100, f"{differing} of {out.numel()} outputs are not the sum rounded once"


def round_trip(rows, x_TD, gates_TK, plan, dtype):
    """permute -> a row-wise "expert" that maps zero rows to zero -> unpermute; (out, grad x, grad gates),
    and the experts' input."""
    x, gates = x_TD.clone().requires_grad_(), gates_TK.clone().requires_grad_()
    x_rows = permute(x, plan, dtype, rows)
    y = torch.tanh(x_rows) * torch.linspace(0.5, 1.5, x_rows.shape[1], device=DEVICE, dtype=dtype)
    out = unpermute(y, gates, plan, x_TD.shape[0], rows)
    weights = torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)
    (out.float() * weights).sum().backward()
    return (out.detach().float(), x.grad, gates.grad), x_rows.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("align", [1, 8])
@pytest.mark.parametrize("top_k, capacity", [(1, None), (2, None), (2, 3)], ids=["top1", "top2", "top2_drops"])
def test_kernels_equal_the_eager_permute_and_combine(dtype, align, top_k, capacity, triton_runs):
    """fp32 tokens permuted into `dtype` rows (the cast inside the gather); 300 hidden columns: two column
    blocks, the second partly masked. Padding rows are zeros going in and get zero gradients."""
    tokens, experts, hidden = 21, 4, 300
    _, gates, plan = routed(tokens, experts, top_k, capacity)
    assert (plan.dropped > 0) == (capacity is not None)
    # fp32 values that bf16 holds exactly: both casts agree (the interpreter truncates where torch rounds)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).bfloat16().float().to(DEVICE)
    expected, eager_rows = round_trip(None, x, gates, plan, dtype)
    rows = expert_rows(plan, tokens, top_k, align)
    actual, kernel_rows = round_trip(rows, x, gates, plan, dtype)
    padding = rows.slot_P < 0
    assert kernel_rows.dtype == dtype and actual[1].dtype == torch.float32  # x's gradient in x's dtype
    assert (kernel_rows[padding] == 0).all() and torch.equal(kernel_rows[~padding], eager_rows)
    # the eager path rounds each weighted row, and with top-2 each token's input gradient, to `dtype` before
    # summing; the kernels sum in fp32
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for name, a, e in zip(["out", "grad x", "grad gates"], actual, expected):
        torch.testing.assert_close(a.float(), e.float(), **tolerance, msg=name)


@contextlib.contextmanager
def deterministic_empties():
    """torch.empty filled with NaN (torch's deterministic mode), as a debugging aid."""
    was = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was[0])
        torch.utils.deterministic.fill_uninitialized_memory = was[1]


def test_padding_rows_get_zero_gradients_whatever_the_experts_left_there(triton_runs):
    """The combine's backward writes every row of y's gradient: zeros for padding, which the expert
    GEMM's weight gradients then read (a NaN left there would reach every weight of that expert)."""
    tokens, top_k = 21, 2
    _, gates, plan = routed(tokens, 4, top_k, None)
    rows = expert_rows(plan, tokens, top_k, 8)
    y = torch.randn(rows.slot_P.numel(), 32, device=DEVICE)
    y[rows.slot_P < 0] = float("nan")  # whatever is left in padding rows: the combine must not read it
    y.requires_grad_()
    out = unpermute(y, gates, plan, tokens, rows)
    with deterministic_empties():  # a row the kernel leaves unwritten stays NaN
        out.sum().backward()
    assert torch.isfinite(out).all()
    assert (y.grad[rows.slot_P < 0] == 0).all() and torch.isfinite(y.grad).all()


def test_bf16_rows_of_fp32_tokens_sum_their_gradients_in_fp32(triton_runs):
    """Top-2 rows gathered from fp32 tokens into bf16: each token's gradient is the sum of its two rows'
    bf16 gradients, taken in fp32 and rounded once to fp32 (a sum in bf16 loses about 3 digits)."""
    tokens, top_k = 21, 2
    _, _, plan = routed(tokens, 4, top_k, None)
    rows = expert_rows(plan, tokens, top_k, 1)
    x = torch.randn(tokens, 32, device=DEVICE, requires_grad=True)
    x_rows = permute(x, plan, torch.bfloat16, rows)
    grad_rows = torch.randn(x_rows.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    x_rows.backward(grad_rows)
    expected = grad_rows.double()[rows.row_TK].sum(1)  # [T, k, D] -> [T, D], every slot kept (dropless)
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("config, checkpointing", [("configs/tiny_vanilla_cpu.json", "none"),
                                                   ("configs/tiny_unipool_cpu.json", "none"),
                                                   ("configs/tiny_unipool_cpu.json", "ffn")])
@pytest.mark.parametrize("align", [1, 8], ids=["unpadded", "padded"])
def test_model_with_the_kernels_equals_the_torch_model(config, checkpointing, align, tiny_config, triton_runs,
                                                       monkeypatch):
    """model.permute_kernel reaches every MoE layer: one gather and one combine per layer each way (the
    forward twice where the experts are recomputed in backward). With the grouped_mm experts padded as on
    CUDA (`align` 8): the kernels lay the rows out padded and the experts pad nothing again; the torch
    path's experts pad them themselves; the same numbers. (On CUDA the experts are Triton's, which pad
    nothing themselves and compute padded rows as zeros.)"""
    from megatron_unipool.kernels import grouped_gemm, permute as kernels
    from megatron_unipool.moe import experts

    launches = []
    for name in ("_gather_rows_kernel", "_sum_rows_kernel", "_combine_backward_kernel"):
        monkeypatch.setattr(kernels, name, RecordedLaunches(getattr(kernels, name), name, launches))
    for module in (grouped_gemm, experts):
        monkeypatch.setattr(module, "expert_row_alignment", lambda *args: align)
    pad = grouped_gemm.padded_rows

    def padded_again(*args):
        raise AssertionError("the expert GEMM padded rows that came padded")

    monkeypatch.setattr(grouped_gemm, "padded_rows", padded_again)  # dispatch.expert_rows holds its own reference

    def launched_once_each_way_per_layer(model, kernel):
        layers = len(model.moe_layers()) if kernel == "triton" else 0
        forwards = 2 if checkpointing == "ffn" else 1
        # forward: a gather and a combine (a sum of rows); backward: the combine's and the gather's (a sum of rows)
        assert sorted(launches) == sorted((["_gather_rows_kernel", "_sum_rows_kernel"] * forwards
                                           + ["_combine_backward_kernel", "_sum_rows_kernel"]) * layers)
        launches.clear()
        grouped_gemm.padded_rows = pad  # the torch path's experts pad

    # grouped_mm experts take fp32 on a CPU; on CUDA bf16 only, so there the fp32 model's experts are Triton's,
    # which take rows padded or not (the loop takes no padding)
    gemm = "grouped_mm" if DEVICE == "cpu" else "triton"
    cfg = tiny_config(config, "moe.top_k=2", f"model.expert_gemm={gemm}", f"model.activation_checkpointing={checkpointing}")
    assert_triton_model_equals_torch_model(cfg, "permute_kernel", DEVICE, launched_once_each_way_per_layer)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU")
def test_triton_without_cuda_or_the_interpreter_is_refused(monkeypatch, tiny_config):
    from megatron_unipool.model import LanguageModel

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = tiny_config("configs/tiny_vanilla_cpu.json", "model.permute_kernel=triton")
    model = LanguageModel(cfg.model, cfg.moe)
    with pytest.raises(KernelUnavailableError, match="model.permute_kernel='triton'"):
        model(torch.zeros(1, 8, dtype=torch.long))
