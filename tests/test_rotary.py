"""RoPE: the Triton kernel against the eager rotation in fp32, forward and backward, and the eager
rotation on [B, S, H, K] against the one it replaced on [B, H, S, K]."""
from __future__ import annotations

import pytest
import torch

from megatron_unipool.kernels import KernelUnavailableError, rotary
from megatron_unipool.kernels.rotary import TritonRotary
from kernel_models import DEVICE, assert_triton_model_equals_torch_model
from megatron_unipool.model.rope import RotaryEmbedding

pytestmark = pytest.mark.usefixtures("single_thread")


def tables(head_dim, positions=40):
    rope = RotaryEmbedding(head_dim, positions, base=10000.0).to(DEVICE)
    return rope.cos, rope.sin


def rotated_and_gradient(fn, x, weights):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    (out.float() * weights).sum().backward()
    return out.detach().float(), x.grad.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 7, 3, 8), (1, 33, 2, 6), (3, 5, 4, 64)])
def test_kernel_matches_the_eager_rotation_in_fp32(dtype, shape, triton_runs):
    """Rows not a multiple of the program's, a head dim whose half is not a power of two, a sequence
    shorter than the tables; the gradient under arbitrary output weights."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    weights = torch.randn(shape, generator=generator).to(DEVICE)
    cos, sin = tables(shape[-1])
    ours = rotated_and_gradient(lambda t: rotary(t, cos, sin, "triton"), x, weights)
    reference = rotated_and_gradient(lambda t: rotary(t.float(), cos, sin, "torch"), x, weights)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    for a, e in zip(ours, reference):
        torch.testing.assert_close(a, e, **tolerance)


@pytest.mark.parametrize("positions", [9, 12])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_sequence_longer_than_the_tables_is_refused_by_both_paths(backend, positions, triton_runs):
    """The kernel read the angles of positions past the tables from whatever memory followed them (NaN or
    wrong logits, an out-of-bounds read on CUDA); the eager path failed with a broadcast error. One
    position past the tables too; a sequence as long as them is rotated."""
    cos, sin = tables(8, positions=8)
    with pytest.raises(ValueError, match=f"a sequence of {positions} positions is longer than the rotary tables' 8"):
        rotary(torch.randn(1, positions, 2, 8).to(DEVICE), cos, sin, backend)
    x = torch.randn(1, 8, 2, 8).to(DEVICE)
    torch.testing.assert_close(rotary(x, cos, sin, backend), rotary(x, cos, sin, "torch"), rtol=1e-5, atol=1e-5)


def test_kernel_reads_strided_rows(triton_runs):
    """A [B, S, H, K] view of a [B, H, S, K] tensor (how the gradient comes back through attention's
    transpose) and rows with a gap between them: the kernel reads them in place; elements with gaps between
    them are copied first."""
    generator = torch.Generator().manual_seed(0)
    cos, sin = tables(8)
    # views taken on the device: .to() copies a view with gaps between its rows contiguously
    for x in (torch.randn(2, 3, 9, 8, generator=generator).to(DEVICE).transpose(1, 2),
              torch.randn(2, 9, 3, 12, generator=generator).to(DEVICE)[..., 2:10],
              torch.randn(2, 9, 3, 16, generator=generator).to(DEVICE)[..., ::2]):
        assert not x.is_contiguous()
        torch.testing.assert_close(TritonRotary.apply(x, cos[:9], sin[:9]), rotary(x, cos, sin, "torch"),
                                   rtol=1e-5, atol=1e-5)


def test_eager_rotation_on_the_projection_layout_equals_the_transposed_one():
    """Applied on [B, S, H, K] before the transpose it is bit for bit the rotation it replaced on the
    [B, H, S, K] view (rotate half: -x2, x1)."""
    x = torch.randn(2, 9, 3, 8).bfloat16().to(DEVICE)
    cos, sin = tables(8)

    def before(x_BHSK):
        c, s = cos[: x_BHSK.shape[-2]].to(x_BHSK.dtype), sin[: x_BHSK.shape[-2]].to(x_BHSK.dtype)
        first, second = x_BHSK.chunk(2, dim=-1)
        return x_BHSK * c + torch.cat([-second, first], dim=-1) * s

    assert torch.equal(rotary(x, cos, sin, "torch").transpose(1, 2), before(x.transpose(1, 2)))


def test_model_with_the_kernel_equals_the_eager_model(tiny_config, triton_runs, monkeypatch):
    """model.rope_kernel decides: the kernel rotates q and k of every layer, in one call on the query and key
    heads of the fused projection's output (rows strided over the value heads), with the eager model's logits
    and gradients."""
    config = tiny_config("configs/tiny_vanilla_cpu.json")
    calls = []
    apply = TritonRotary.apply
    monkeypatch.setattr(TritonRotary, "apply", lambda *args: calls.append(1) or apply(*args))

    def rotated_q_and_k_of_every_layer(model, kernel):
        assert len(calls) == (config.model.num_layers if kernel == "triton" else 0)
        calls.clear()

    assert_triton_model_equals_torch_model(config, "rope_kernel", DEVICE, rotated_q_and_k_of_every_layer)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU")
def test_triton_without_cuda_or_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cos, sin = tables(8)
    with pytest.raises(KernelUnavailableError, match="model.rope_kernel='triton'"):
        rotary(torch.randn(1, 4, 2, 8), cos, sin, "triton")
