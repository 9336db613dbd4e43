"""The SwiGLU activation kernel against torch's ops in fp32: alone, under autograd (the dense FFN),
inside the grouped expert computation (padded, deferred), and in whole models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_unipool.kernels import KernelUnavailableError, grouped_gemm, grouped_swiglu, swiglu_activation
from megatron_unipool.kernels import swiglu as swiglu_module
from megatron_unipool.kernels.swiglu import swiglu_backward, swiglu_forward
from kernel_models import (DEVICE, GROUPED_MM_PRECISIONS, assert_triton_model_equals_torch_model,
                           skip_fp32_grouped_mm_on_cuda)

pytestmark = pytest.mark.usefixtures("single_thread")

TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-6}, torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2}}


def tensors(*shape, dtype=torch.float32, count=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=generator) * 2).to(DEVICE, dtype) for _ in range(count)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_fp32_ops(dtype, triton_runs):
    """3 x 1001 elements: the last program partly masked."""
    grad_hidden, gate, up = tensors(3, 1001, dtype=dtype)
    reference_gate, reference_up = gate.float().requires_grad_(), up.float().requires_grad_()
    reference = F.silu(reference_gate) * reference_up
    reference.backward(grad_hidden.float())
    torch.testing.assert_close(swiglu_forward(gate, up, "triton").float(), reference.detach(), **TOLERANCE[dtype])
    grad_gate, grad_up, hidden = swiglu_backward(grad_hidden, gate, up, "triton")
    for ours, expected in ((grad_gate, reference_gate.grad), (grad_up, reference_up.grad), (hidden, reference)):
        assert ours.dtype == dtype
        torch.testing.assert_close(ours.float(), expected.detach(), **TOLERANCE[dtype])
    assert swiglu_backward(grad_hidden, gate, up, "triton", need_hidden=False)[2] is None


def test_dense_activation_under_autograd(triton_runs):
    gate, up, weights = tensors(4, 37)
    results = []
    for backend in ("triton", "torch"):
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        out = swiglu_activation(g, u, backend)
        (out * weights).sum().backward()
        results.append((out.detach(), g.grad, u.grad))
    for ours, expected in zip(*results):
        torch.testing.assert_close(ours, expected, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("layout", ["broadcast_gradient", "transposed_gradient", "transposed_gate"])
def test_dense_activation_takes_tensors_of_any_layout(layout, triton_runs):
    """`out.sum().backward()` hands the kernel a stride-0 gradient, a transposed use of the output a column-major
    one, and an input may be a view laid out unlike the other: the kernel reads flat elements, so each must be
    made contiguous."""
    gate, up = tensors(4, 37, count=2)
    if layout == "transposed_gate":
        gate = gate.t().contiguous().t()  # the same values, column-major
    results = []
    for backend in ("triton", "torch"):
        g, u = gate.detach().requires_grad_(), up.clone().requires_grad_()
        out = swiglu_activation(g, u, backend)
        if layout == "broadcast_gradient":
            out.sum().backward()
        else:
            (out.t() * torch.arange(out.numel(), dtype=out.dtype, device=DEVICE).view(out.shape[1], out.shape[0])
             ).sum().backward()
        results.append((out.detach(), g.grad, u.grad))
    for ours, expected in zip(*results):
        torch.testing.assert_close(ours, expected, **TOLERANCE[torch.float32])


# rows past the last padded group are never written by grouped_mm: the interpreter warns about their garbage
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # overflow / invalid value in those rows
@pytest.mark.parametrize("precision", GROUPED_MM_PRECISIONS)
@pytest.mark.parametrize("align_rows", [1, 8])
@pytest.mark.parametrize("deferred", [False, True])
def test_grouped_experts_with_the_kernel_equal_torch(align_rows, deferred, precision, triton_runs):
    """The grouped_mm path (as on CUDA: padded rows; and the pool's deferred weight gradients over two
    calls, regrouped together), in fp32 and under bf16 autocast (CUDA's grouped_mm takes bf16 only)."""
    skip_fp32_grouped_mm_on_cuda(precision)
    if align_rows == 1 and DEVICE == "cuda":
        pytest.skip("CUDA's grouped_mm needs each expert's rows padded to 16 bytes: align_rows=1 is for rows the"
                    " permute kernel laid out padded already")
    autocast = precision == "bf16_autocast"
    generator = torch.Generator().manual_seed(0)
    counts = [torch.tensor(c, device=DEVICE) for c in ([5, 0, 9, 2], [1, 7, 0, 8])]
    x = torch.randn(16, 16, generator=generator).to(DEVICE)
    weights = [(torch.randn(shape, generator=generator) * 0.3).to(DEVICE)
               for shape in ((4, 24, 16), (4, 24, 16), (4, 16, 24))]
    results = []
    for activation in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (x, *weights)]
        collector = grouped_gemm.DeferredWeightGradients() if deferred else None
        out = collector.attach(leaves[0], *leaves[1:]) if deferred else leaves[0]
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            for call_counts in counts:  # two layers
                out = grouped_swiglu(out, call_counts, *leaves[1:], backend="grouped_mm", align_rows=align_rows,
                                     deferred=collector, activation=activation)
        assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
        out.float().square().sum().backward()
        results.append([out.detach().float()] + [t.grad for t in leaves])
    # bf16: the kernel rounds silu(gate) * up once, torch's ops twice
    rtol, relative_atol = (2e-2, 2e-2) if autocast else (1e-4, 1e-5)
    for ours, expected in zip(*results):
        torch.testing.assert_close(ours, expected, rtol=rtol, atol=relative_atol * expected.abs().max().item())


@pytest.mark.parametrize("config", ["configs/tiny_dense_cpu.json", "configs/tiny_unipool_cpu.json"])
def test_model_with_the_kernel_equals_the_torch_model(config, tiny_config, triton_runs, monkeypatch):
    """model.swiglu_kernel decides for every FFN, forward and backward: the dense ones and the experts', in
    fp32 (under bf16 a rounding apart flips some routing choices): the experts by grouped_mm on a CPU, by
    the Triton GEMMs on CUDA (whose grouped_mm takes bf16 only), both calling the activation alike."""
    cfg = tiny_config(config, f"model.expert_gemm={'grouped_mm' if DEVICE == 'cpu' else 'triton'}")
    backends = []
    forward = grouped_gemm.swiglu_forward
    backward = grouped_gemm.swiglu_backward
    monkeypatch.setattr(grouped_gemm, "swiglu_forward", lambda g, u, b: backends.append(b) or forward(g, u, b))
    monkeypatch.setattr(grouped_gemm, "swiglu_backward", lambda *a: backends.append(a[3]) or backward(*a))
    apply = swiglu_module._TritonSwiGLUActivation.apply
    monkeypatch.setattr(swiglu_module._TritonSwiGLUActivation, "apply",
                        lambda *a: backends.append("triton") or apply(*a))

    def every_ffn_took_the_kernel(model, kernel):
        moe_layers = len(model.moe_layers())  # forward and backward each; a dense FFN's kernel is one autograd op
        assert backends.count("triton") == (2 * moe_layers + cfg.model.num_layers - moe_layers if kernel == "triton" else 0)
        backends.clear()

    assert_triton_model_equals_torch_model(cfg, "swiglu_kernel", DEVICE, every_ffn_took_the_kernel)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU")
def test_triton_without_cuda_or_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    gate, up, _ = tensors(2, 8)
    with pytest.raises(KernelUnavailableError, match="model.swiglu_kernel='triton'"):
        swiglu_forward(gate, up, "triton")
    # the experts' segment loop, which computes the activation with torch's ops, refuses it alike
    x = torch.randn(8, 16)
    weights = [torch.randn(shape) for shape in ((3, 24, 16), (3, 24, 16), (3, 16, 24))]
    with pytest.raises(KernelUnavailableError, match="model.swiglu_kernel='triton'"):
        grouped_swiglu(x, torch.tensor([3, 0, 5]), *weights, backend="loop", activation="triton")
