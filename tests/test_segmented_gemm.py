"""The pool's weight gradients read in place (kernels.segmented_gemm, Triton: interpreted on a CPU)
against per-call sums in fp64, inside DeferredWeightGradients, and in a UniPool model."""
from __future__ import annotations

import pytest
import torch

from megatron_unipool.kernels import DeferredWeightGradients, KernelUnavailableError, grouped_gemm, grouped_swiglu
from megatron_unipool.kernels.segmented_gemm import segmented_weight_gradient
from kernel_models import (DEVICE, GROUPED_MM_PRECISIONS, assert_triton_model_equals_torch_model,
                           skip_fp32_grouped_mm_on_cuda, use_gemm_tiles)

pytestmark = pytest.mark.usefixtures("single_thread")



def per_call_sum(a_calls, b_calls, counts_CM):
    """sum over calls of a^T b over each expert's rows, in fp64, one expert slice at a time."""
    experts = counts_CM.shape[1]
    out = torch.zeros(experts, a_calls[0].shape[1], b_calls[0].shape[1], dtype=torch.float64)
    for a, b, counts in zip(a_calls, b_calls, counts_CM.tolist()):
        start = 0
        for e, count in enumerate(counts):
            out[e] += a[start:start + count].double().cpu().t() @ b[start:start + count].double().cpu()
            start += count
    return out


def test_operands_reach_the_kernel_at_16_byte_boundaries():
    """The kernel tells the compiler every call's rows start 16-byte aligned (tl.multiple_of, which the interpreter
    ignores: a misaligned vector load on a GPU); a contiguous view 4 bytes past a boundary is copied first."""
    from megatron_unipool.kernels.segmented_gemm import ALIGN_BYTES, _aligned, _offsets

    base = torch.randn(4 * 16 + 1)
    calls = [torch.randn(4, 16), base[1:].view(4, 16)]
    assert calls[1].is_contiguous() and calls[1].data_ptr() % ALIGN_BYTES
    aligned = _aligned(calls)
    assert all(t.data_ptr() % ALIGN_BYTES == 0 for t in aligned) and aligned[0] is calls[0]
    assert torch.equal(aligned[1], calls[1])
    assert (_offsets(aligned) % (ALIGN_BYTES // 4) == 0).all()


@pytest.mark.parametrize("block_n, block_k, block_r", [(64, 32, 16), (16, 128, 32)])
def test_gradient_with_blocks_of_different_sizes(block_n, block_k, block_r, triton_runs, monkeypatch):
    """Each block size where it belongs (N and K of the gradient, R rows of a segment), none of the sizes a
    multiple of one."""
    from megatron_unipool.kernels import segmented_gemm

    use_gemm_tiles(monkeypatch, segmented_gemm._segmented_at_b_kernel, BLOCK_N=block_n, BLOCK_K=block_k,
                   BLOCK_R=block_r)
    generator = torch.Generator().manual_seed(0)
    counts_CM = torch.tensor([[3, 0, 40, 1], [0, 5, 2, 17]])
    a_calls = [torch.randn(int(c.sum()), 70, generator=generator).to(DEVICE) for c in counts_CM]
    b_calls = [torch.randn(int(c.sum()), 150, generator=generator).to(DEVICE) for c in counts_CM]
    out = segmented_weight_gradient(a_calls, b_calls, counts_CM.to(DEVICE))
    torch.testing.assert_close(out.double().cpu(), per_call_sum(a_calls, b_calls, counts_CM), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gradient_equals_the_per_call_sums(dtype, triton_runs):
    """Segments longer than a block, experts without rows in some calls and in all of them, widths
    that are not multiples of a block, padding rows past the counts (NaN: never read), and operands
    whose rows are strided views (copied first). bf16 products are exact in fp32, so both dtypes match to fp32 sums."""
    generator = torch.Generator().manual_seed(0)
    counts_CM = torch.tensor([[3, 0, 40, 1, 0], [0, 5, 2, 17, 0], [4, 4, 4, 4, 0]])
    padding = [2, 0, 5]

    def operands(width, strided):
        calls = []
        for counts, pad in zip(counts_CM, padding):
            rows = torch.randn(int(counts.sum()) + pad, width + 3 * strided, generator=generator).to(DEVICE, dtype)
            rows[int(counts.sum()):] = float("nan")
            calls.append(rows[:, 3:] if strided else rows)
        return calls

    a_calls, b_calls = operands(24, strided=True), operands(40, strided=False)
    assert a_calls[0].stride(0) == 27
    out = segmented_weight_gradient(a_calls, b_calls, counts_CM.to(DEVICE))
    assert out.dtype == torch.float32 and out.shape == (5, 24, 40)
    expected = per_call_sum(a_calls, b_calls, counts_CM)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-5)
    assert not out[4].any()  # no rows anywhere: zeros


def deferred_calls(kernel, routings, hidden=16, width=32, autocast=False):
    """Loss and weight gradients of grouped_mm calls on one pool, deferred with `kernel`."""
    generator = torch.Generator().manual_seed(1)
    weights = [(torch.randn(shape, generator=generator) * 0.2).to(DEVICE).requires_grad_()
               for shape in ((4, width, hidden), (4, width, hidden), (4, hidden, width))]
    xs = [torch.randn(sum(counts), hidden, generator=generator).to(DEVICE) for counts in routings]
    collector = DeferredWeightGradients(kernel)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        anchor = collector.attach(torch.zeros((), device=DEVICE), *weights)
        outs = [grouped_swiglu(x + anchor, torch.tensor(counts, device=DEVICE), *weights, backend="grouped_mm",
                               align_rows=8, deferred=collector) for x, counts in zip(xs, routings)]
    assert all(out.dtype == (torch.bfloat16 if autocast else torch.float32) for out in outs)
    loss = sum((out.float() * torch.linspace(-1, 1, hidden, device=DEVICE)).sum() for out in outs)
    loss.backward()
    return [w.grad for w in weights]


@pytest.mark.parametrize("precision", GROUPED_MM_PRECISIONS)
def test_deferred_gradients_with_the_kernel_equal_the_regrouped_ones(precision, triton_runs, monkeypatch):
    """Three calls with the CUDA row padding: the same three weight gradients as regrouping the rows
    for torch._grouped_mm, from one kernel launch per weight (the regrouping never runs)."""
    skip_fp32_grouped_mm_on_cuda(precision)
    autocast = precision == "bf16_autocast"
    routings = [[3, 0, 7, 1], [0, 5, 0, 2], [4, 4, 4, 4]]
    expected = deferred_calls("torch", routings, autocast=autocast)
    launches = []
    segmented = grouped_gemm.segmented_weight_gradient
    monkeypatch.setattr(grouped_gemm, "segmented_weight_gradient", lambda *a: launches.append(1) or segmented(*a))
    monkeypatch.setattr(grouped_gemm, "_regrouped", None)
    actual = deferred_calls("triton", routings, autocast=autocast)
    assert len(launches) == 3
    # the regrouped path rounds its bf16 total once, the kernel returns the fp32 sum
    tolerance = {"rtol": 1e-2, "atol": 1e-3} if autocast else {"rtol": 1e-5, "atol": 1e-6}
    for name, a, e in zip(["w_gate", "w_up", "w_down"], actual, expected):
        torch.testing.assert_close(a, e, **tolerance, msg=name)


@pytest.mark.parametrize("precision", GROUPED_MM_PRECISIONS)
def test_unipool_model_with_the_kernel_equals_the_torch_model(precision, tiny_config, triton_runs, monkeypatch):
    """model.pool_wgrad_kernel: the pool's gradients (one launch per weight), and every other, unchanged."""
    skip_fp32_grouped_mm_on_cuda(precision)
    launches = []
    segmented = grouped_gemm.segmented_weight_gradient
    monkeypatch.setattr(grouped_gemm, "segmented_weight_gradient", lambda *a: launches.append(1) or segmented(*a))
    cfg = tiny_config("configs/tiny_unipool_cpu.json", "model.expert_gemm=grouped_mm", "model.hidden_size=32",
                      "model.ffn_hidden_size=32", "model.num_heads=2", "model.num_kv_heads=1", "moe.pool_size=8")

    def one_launch_per_weight(model, kernel):
        assert model.expert_pools[0].wgrad_kernel == kernel
        assert len(launches) == (3 if kernel == "triton" else 0)
        launches.clear()

    assert_triton_model_equals_torch_model(cfg, "pool_wgrad_kernel", DEVICE, one_launch_per_weight,
                                           autocast=precision == "bf16_autocast")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU")
def test_triton_without_cuda_or_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    weights = [torch.zeros(2, 8, 8, requires_grad=True) for _ in range(3)]
    with pytest.raises(KernelUnavailableError, match="model.pool_wgrad_kernel='triton'"):
        DeferredWeightGradients("triton").attach(torch.zeros(()), *weights)
