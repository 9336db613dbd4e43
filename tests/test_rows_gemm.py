"""The experts' Triton GEMMs for few rows per expert (kernels/rows_gemm.py; interpreted on a CPU) against
per-expert products, and `model.expert_gemm: triton` in whole models against the segment loop. The
SwiGLU experts' forward, backward and deferred weight gradients with it are in tests/test_kernels.py
(the `triton` case); tests/test_triton_compile.py compiles it for sm_90."""
from __future__ import annotations

import pytest
import torch

from megatron_unipool.kernels import KernelUnavailableError, grouped_swiglu
from megatron_unipool.kernels.rows_gemm import rows_grouped_mm
from kernel_models import DEVICE, RecordedLaunches, assert_triton_model_equals_torch_model, use_gemm_tiles

pytestmark = pytest.mark.usefixtures("single_thread")


def per_expert(a, b, counts, a2=None, b2=None):
    """a[rows of e] @ b[e] (+ a2 @ b2[e]) expert by expert, in fp64."""
    outs, start = [], 0
    for e, count in enumerate(counts):
        rows = slice(start, start + count)
        out = a[rows].double() @ b[e].double()
        outs.append(out if a2 is None else out + a2[rows].double() @ b2[e].double())
        start += count
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["transposed", "as_stored"])
@pytest.mark.parametrize("pair", [False, True], ids=["one_product", "two_products"])
def test_rows_grouped_mm_equals_per_expert_products(dtype, layout, pair, triton_runs):
    """Experts with no rows, one row, and rows over several row blocks; widths that are not multiples of
    the blocks; weights read transposed (the forward's [M, N, K] weights) or as they lie (the input
    gradient's [M, K, N])."""
    generator = torch.Generator().manual_seed(0)
    counts, k, n = [5, 0, 37, 1, 20], 24, 40

    def weights(k_dim):
        if layout == "transposed":  # stored [M, N, K], used as [M, K, N]
            return torch.randn(len(counts), n, k_dim, generator=generator).to(DEVICE, dtype).transpose(-2, -1)
        return torch.randn(len(counts), k_dim, n, generator=generator).to(DEVICE, dtype)

    a = torch.randn(sum(counts), k, generator=generator).to(DEVICE, dtype)
    b = weights(k)
    a2, b2 = (torch.randn(sum(counts), 16, generator=generator).to(DEVICE, dtype), weights(16)) if pair else (None, None)
    ends = torch.cumsum(torch.tensor(counts, device=DEVICE), 0)
    out = rows_grouped_mm(a, b, ends, a2, b2)
    expected = per_expert(a, b, counts, a2, b2)
    assert out.dtype == dtype and out.shape == (sum(counts), n)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    torch.testing.assert_close(out.double(), expected, **tolerance)


@pytest.mark.parametrize("block_n, block_k, block_s", [(64, 32, 16), (32, 16, 64)])
def test_rows_grouped_mm_with_blocks_of_different_sizes(block_n, block_k, block_s, triton_runs, monkeypatch):
    """Each block size where it belongs (N columns, K depth, an expert's rows), none of the sizes a multiple of one;
    the rows read column-major."""
    from megatron_unipool.kernels import rows_gemm

    use_gemm_tiles(monkeypatch, rows_gemm._rows_grouped_mm_kernel, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_S=block_s)
    generator = torch.Generator().manual_seed(0)
    counts, k, n = [5, 0, 70, 1, 20, 0], 72, 150
    a = torch.randn(k, sum(counts), generator=generator).to(DEVICE).t()  # column-major: copied before the kernel
    b = torch.randn(len(counts), n, k, generator=generator).to(DEVICE).transpose(1, 2)
    out = rows_grouped_mm(a, b, torch.cumsum(torch.tensor(counts, device=DEVICE), 0))
    torch.testing.assert_close(out.double(), per_expert(a, b, counts), rtol=1e-5, atol=1e-4)


def test_rows_grouped_mm_over_a_large_pool_with_few_rows_each(triton_runs):
    """96 experts (UniPool's 182M pool: more than a power of two of them), 0-7 rows each, rows past the
    last expert's end left alone."""
    generator = torch.Generator().manual_seed(1)
    counts = torch.randint(0, 8, (96,), generator=generator).tolist()
    a = torch.randn(sum(counts) + 5, 32, generator=generator).to(DEVICE)
    b = torch.randn(96, 32, 48, generator=generator).to(DEVICE)
    out = rows_grouped_mm(a, b, torch.cumsum(torch.tensor(counts, device=DEVICE), 0))
    torch.testing.assert_close(out[: sum(counts)].double(), per_expert(a, b, counts), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", ["configs/tiny_vanilla_cpu.json", "configs/tiny_unipool_cpu.json"])
def test_model_with_the_triton_expert_gemms_equals_the_loop_model(config, tiny_config, triton_runs, monkeypatch):
    """Every expert GEMM of the model through Triton: per MoE layer 5 of kernels/rows_gemm.py (3 forward, 2
    backward); the weight gradients by kernels/segmented_gemm.py, 3 per layer, or with UniPool's shared
    pool 3 per backward (deferred, every layer's rows read in place). The same logits and gradients as
    the segment loop's."""
    from megatron_unipool.kernels import rows_gemm, segmented_gemm

    launches = []
    monkeypatch.setattr(rows_gemm, "_rows_grouped_mm_kernel",
                        RecordedLaunches(rows_gemm._rows_grouped_mm_kernel, "rows", launches))
    monkeypatch.setattr(segmented_gemm, "_segmented_at_b_kernel",
                        RecordedLaunches(segmented_gemm._segmented_at_b_kernel, "wgrad", launches))

    def launched(model, kernel):
        layers = len(model.moe_layers()) if kernel == "triton" else 0
        weight_gradient_calls = len(model.expert_pools) if kernel == "triton" else 0
        assert sorted(launches) == ["rows"] * 5 * layers + ["wgrad"] * 3 * weight_gradient_calls
        launches.clear()

    # narrow: the interpreter runs every program of every launch in Python
    cfg = tiny_config(config, "moe.top_k=2", "model.num_layers=2", "model.hidden_size=32", "model.num_heads=2",
                      "model.num_kv_heads=1", "model.ffn_hidden_size=48", "moe.num_experts=4")
    assert_triton_model_equals_torch_model(cfg, "expert_gemm", DEVICE, launched, reference="loop")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU")
@pytest.mark.parametrize("config", ["configs/tiny_vanilla_cpu.json", "configs/tiny_unipool_cpu.json"])
def test_triton_expert_gemms_without_cuda_or_the_interpreter_are_refused(config, tiny_config, monkeypatch):
    """Named as the setting the user made, also where UniPool's shared pool first asks for the Triton
    weight-gradient kernel."""
    from megatron_unipool.model import LanguageModel

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, counts, weights = torch.zeros(3, 16), torch.tensor([1, 2]), [torch.zeros(2, 32, 16)] * 2 + [torch.zeros(2, 16, 32)]
    with pytest.raises(KernelUnavailableError, match="model.expert_gemm='triton'"):
        grouped_swiglu(x, counts, *weights, backend="triton")
    cfg = tiny_config(config, "model.expert_gemm=triton")
    with pytest.raises(KernelUnavailableError, match="model.expert_gemm='triton'"):
        LanguageModel(cfg.model, cfg.moe)(torch.zeros(1, 8, dtype=torch.long))
