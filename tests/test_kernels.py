"""Kernels against the plain PyTorch computation they replace, forward and backward, fp32 and bf16.

CUDA-only paths (torch._grouped_mm's GPU kernel, flash-attn, apex) are compared with the same
references and skip with the reason when this machine lacks them.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_unipool.config import ModelConfig, MoEConfig, TrainConfig
from megatron_unipool.kernels import (DeferredWeightGradients, KernelUnavailableError, causal_attention, grouped_swiglu,
                                      rms_norm)
from megatron_unipool.kernels.attention import flash_available
from megatron_unipool.kernels.grouped_gemm import expert_row_alignment, grouped_mm_supported, resolve_expert_gemm
from megatron_unipool.kernels.rms_norm import apex_rms_norm_available
from megatron_unipool.model import LanguageModel
from megatron_unipool.moe import Router
from megatron_unipool.moe.dispatch import permute, plan_dispatch, unpermute
from megatron_unipool.training.optimizer import build_optimizer, decay_groups
from kernel_models import DEVICE, TRITON_RUNS

pytestmark = pytest.mark.usefixtures("single_thread")

CUDA = DEVICE == "cuda"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
# fp32 results differ from the reference only by summation order; bf16 rounds every product
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def expert_inputs(counts, hidden=16, width=24, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    experts, slots = len(counts), sum(counts)

    def tensor(*shape, std):
        return (torch.randn(*shape, generator=generator) * std).to(device, dtype).requires_grad_()

    return (tensor(slots, hidden, std=1.0), torch.tensor(counts, device=device), tensor(experts, width, hidden, std=0.3),
            tensor(experts, width, hidden, std=0.3), tensor(experts, hidden, width, std=0.3))


def per_slot_reference(x, counts, w_gate, w_up, w_down):
    """Each slot through its own expert, one at a time, in fp32: the definition, no grouping. The
    weights are cast once, so their gradients add up over the slots in fp32 (cast per slot, bf16
    weights would sum 200 slots' gradients in bf16, 3% off)."""
    expert_of_slot = torch.repeat_interleave(torch.arange(len(counts)), counts.cpu()).tolist()
    w_gate, w_up, w_down = (w.float() for w in (w_gate, w_up, w_down))
    rows = []
    for slot, e in enumerate(expert_of_slot):
        h = x[slot].float()
        rows.append(w_down[e] @ (F.silu(w_gate[e] @ h) * (w_up[e] @ h)))
    return torch.stack(rows) if rows else x.float() * 0


def forward_backward(fn, inputs):
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    weights = torch.linspace(-1, 1, out.shape[-1], device=out.device)
    (out.float() * weights).sum().backward()
    return [out.detach().float()] + [t.grad.float() for t in inputs]


def assert_close_relative(actual, expected, tolerance, what):
    scale = expected.abs().max().clamp(min=1e-6)
    error = (actual - expected).abs().max() / scale
    assert error <= tolerance, f"{what}: max error {error:.2e} of the largest entry (allowed {tolerance:.0e})"


GEMM_CASES = {
    "loop": dict(backend="loop"),
    "grouped_mm": dict(backend="grouped_mm"),
    "grouped_mm_padded": dict(backend="grouped_mm", align_rows=8),  # the CUDA path's row padding, on CPU
    "triton": dict(backend="triton"),  # kernels.rows_gemm and segmented_gemm: compiled on CUDA, interpreted on a CPU
}
CASES = [pytest.param(case, marks=pytest.mark.skipif(case == "triton" and not TRITON_RUNS,
                                                     reason="Triton runs neither compiled (no CUDA) nor interpreted here"))
         for case in GEMM_CASES]


def case_device(case: str) -> str:
    """Where a case's tensors live: Triton's on the device its kernels run on (compiled on CUDA, interpreted on
    a CPU); the others on the CPU (on CUDA torch._grouped_mm takes bf16 only: test_deferred_weight_gradients_on_cuda)."""
    return DEVICE if case == "triton" else "cpu"


def case_collector(case: str) -> DeferredWeightGradients:
    """The deferred weight gradients as ExpertPool pairs them with the case's expert GEMMs."""
    return DeferredWeightGradients("triton" if GEMM_CASES[case]["backend"] == "triton" else "torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("counts", [[3, 0, 7, 1, 9], [0, 0, 0, 0, 5], [4, 4, 4, 4, 4], [128, 64, 0, 200]],
                         ids=["uneven", "one", "even", "large"])
def test_grouped_swiglu_matches_per_slot_reference(case, dtype, counts):
    x, counts_M, *weights = expert_inputs(counts, dtype=dtype, device=case_device(case))
    inputs = [x, *weights]
    expected = forward_backward(lambda x, *w: per_slot_reference(x, counts_M, *w), inputs)
    actual = forward_backward(lambda x, *w: grouped_swiglu(x, counts_M, *w, **GEMM_CASES[case]), inputs)
    for name, a, e in zip(["out", "grad x", "grad w_gate", "grad w_up", "grad w_down"], actual, expected):
        assert_close_relative(a, e, TOLERANCE[dtype], f"{case} {name}")


@pytest.mark.parametrize("case", CASES)
def test_grouped_swiglu_without_slots_keeps_the_graph(case):
    x, counts_M, *weights = expert_inputs([0, 0, 0], device=case_device(case))
    out = grouped_swiglu(x, counts_M, *weights, **GEMM_CASES[case])
    assert out.shape == (0, x.shape[1])
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("capacity", [None, 2], ids=["dropless", "capacity"])
def test_fused_permute_and_combine_match_plain_indexing(dtype, capacity):
    generator = torch.Generator().manual_seed(0)
    tokens, k, experts = 9, 2, 4
    indices = torch.stack([torch.randperm(experts, generator=generator)[:k] for _ in range(tokens)])
    plan = plan_dispatch(indices, experts, capacity)
    x = torch.randn(tokens, 8, generator=generator).to(dtype).requires_grad_()
    gates = torch.rand(tokens, k, generator=generator).requires_grad_()  # fp32, as the router makes them
    w = torch.randn(8, 8, generator=generator).to(dtype)

    def fused(x, gates):
        return unpermute(permute(x, plan, dtype) @ w, gates, plan, tokens)

    def plain(x, gates):
        y = x[plan.token_S] @ w
        weighted = y * gates.reshape(-1)[plan.slot_S].unsqueeze(-1).to(y.dtype)
        return torch.zeros(tokens, 8, dtype=y.dtype).index_put((plan.token_S,), weighted, accumulate=True)

    expected, actual = forward_backward(plain, [x, gates]), forward_backward(fused, [x, gates])
    for name, a, e in zip(["out", "grad x", "grad gates"], actual, expected):
        assert_close_relative(a, e, TOLERANCE[dtype], f"combine {name}")
    assert torch.autograd.gradcheck(lambda y, g: unpermute(y, g, plan, tokens),
                                    (torch.randn(len(plan.token_S), 3, dtype=torch.float64, requires_grad=True),
                                     torch.rand(tokens, k, dtype=torch.float64, requires_grad=True)))


@pytest.mark.parametrize("case", CASES)
def test_grouped_swiglu_takes_a_broadcast_gradient(case):
    """`out.sum().backward()` hands the kernel a stride-0 gradient."""
    x, counts_M, *weights = expert_inputs([3, 5], device=case_device(case))
    grouped_swiglu(x, counts_M, *weights, **GEMM_CASES[case]).sum().backward()
    expected = torch.autograd.grad(per_slot_reference(x, counts_M, *weights).sum(), x)[0]
    assert_close_relative(x.grad, expected, 1e-5, f"{case} grad x")


def test_expert_gemm_choice_and_clear_refusal():
    x, counts_M, w_gate, w_up, w_down = expert_inputs([2, 3], hidden=6, width=10)  # rows not 16-byte aligned
    assert not grouped_mm_supported(x.dtype, x.device, w_gate, w_down)
    assert resolve_expert_gemm("auto", x.dtype, x.device, w_gate, w_down) == "loop"
    assert expert_row_alignment("auto", x.dtype, x.device, w_gate, w_down) == 1
    with pytest.raises(KernelUnavailableError, match="model.expert_gemm='grouped_mm'.*multiples of 4"):
        grouped_swiglu(x, counts_M, w_gate, w_up, w_down, backend="grouped_mm")


@pytest.mark.parametrize("case", CASES)
def test_no_rows_give_every_weight_a_zero_gradient(case):
    """An expert-parallel rank whose shard of a pool got no tokens: its weights get zero gradients, not
    none, as on the copies of that shard that got tokens (DeepSpeed's ZeRO buckets skip a parameter
    without a gradient: the copies' reductions then differed in size and gloo aborted)."""
    x, counts_M, *weights = expert_inputs([0, 0, 0], hidden=8, width=8, device=case_device(case))
    out = grouped_swiglu(x, counts_M, *weights, **GEMM_CASES[case])
    assert out.shape == (0, 8)
    out.sum().backward()
    for w in weights:
        assert w.grad is not None and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("case", CASES)
def test_no_rows_in_any_deferred_call_give_every_weight_one_zero_gradient(case):
    """The same where the weight gradients wait for the last of a step's calls (a UniPool pool, whose layers
    each call it): no call gave the shard a row, and its weights still get zero gradients, once each."""
    x, counts_M, *weights = expert_inputs([0, 0, 0], hidden=8, width=8, device=case_device(case))
    events = []
    for w in weights:
        w.register_post_accumulate_grad_hook(lambda p: events.append(p))
    deferred = case_collector(case)
    x_all = deferred.attach(x, *weights)
    compute = [w.detach() for w in weights]  # as ExpertPool calls them: the gradients come from the anchor alone
    outs = [grouped_swiglu(x_all, counts_M, *compute, deferred=deferred, **GEMM_CASES[case]) for _ in range(2)]
    torch.cat(outs).sum().backward()
    for w in weights:
        assert w.grad is not None and torch.equal(w.grad, torch.zeros_like(w))
    assert sorted(map(id, events)) == sorted(map(id, weights))


@pytest.mark.parametrize("counts", [[4, 4, 0], [4, 4, 4], [12, -2, 0]], ids=["short", "long", "negative"])
def test_counts_that_do_not_split_the_rows_are_refused_by_the_loop(counts):
    """The loop, which reads the counts anyway, checks that they split x's 10 rows (it returned 8 rows for
    a split of 8, and ran the wrong experts for one of 12)."""
    x, _, w_gate, w_up, w_down = expert_inputs([4, 4, 2], hidden=8, width=8)
    with pytest.raises(ValueError, match=r"counts_M .* must give each expert a number of rows >= 0, in all the 10"
                                         r" rows of x_SD"):
        grouped_swiglu(x, torch.tensor(counts), w_gate, w_up, w_down, backend="loop")


@pytest.mark.parametrize("case", CASES)
def test_counts_for_another_number_of_experts_are_refused(case):
    x, _, w_gate, w_up, w_down = expert_inputs([4, 4, 2], hidden=8, width=8, device=case_device(case))
    with pytest.raises(ValueError, match=r"counts_M of shape \(2,\) must hold one count for each of the 3 experts"):
        grouped_swiglu(x, torch.tensor([5, 5], device=x.device), w_gate, w_up, w_down, **GEMM_CASES[case])


@pytest.mark.parametrize("dtype, device, shape, needs", [
    (torch.float32, "cpu", (2, 10, 6), "expert widths that are multiples of 4 for torch.float32"),
    (torch.float32, "cuda", (2, 8, 8), "bf16 operands on CUDA"),
    (torch.bfloat16, "cuda", (1024, 8, 8), "at most 1023 experts per rank on CUDA"),  # torch's CUDA kernel's limit
])
def test_the_grouped_mm_refusal_names_the_condition_that_failed(dtype, device, shape, needs):
    w = torch.empty(*shape, device="meta")
    with pytest.raises(KernelUnavailableError, match=f": it needs {needs}; use 'auto' or 'loop'"):
        resolve_expert_gemm("grouped_mm", dtype, torch.device(device), w, w)


def test_auto_expert_gemm_takes_the_loop_for_1024_experts_on_cuda():
    w = torch.empty(1024, 8, 8, device="meta")
    cuda = torch.device("cuda")
    assert resolve_expert_gemm("auto", torch.bfloat16, cuda, w, w) == "loop"
    assert resolve_expert_gemm("auto", torch.bfloat16, cuda, w[:1023], w[:1023]) == "grouped_mm"


def test_padded_rows_start_each_expert_at_an_aligned_row():
    """Counts [0, 16, 3] at alignment 8: slices padded to [0, 16, 8]; expert 1's slots at rows 0-15,
    expert 2's at 16-18 (an empty expert takes no rows)."""
    from megatron_unipool.kernels.grouped_gemm import padded_rows

    rows, padded, num_rows = padded_rows(torch.tensor([0, 16, 3]), 8, 19)
    assert padded.tolist() == [0, 16, 8] and rows.tolist() == list(range(19)) and num_rows == 19 + 3 * 7
    rows, padded, num_rows = padded_rows(torch.tensor([3, 0, 9]), 8, 12)
    assert padded.tolist() == [8, 0, 16] and rows.tolist() == [0, 1, 2] + list(range(8, 17)) and num_rows == 12 + 3 * 7
    rows, padded, num_rows = padded_rows(torch.tensor([3, 0, 9]), 1, 12)  # unpadded: every slot where it is
    assert padded.tolist() == [3, 0, 9] and rows.tolist() == list(range(12)) and num_rows == 12
    generator = torch.Generator().manual_seed(0)
    for align in (2, 8, 16):  # against the layout built expert by expert
        counts = torch.randint(0, 40, (13,), generator=generator) * torch.randint(0, 2, (13,), generator=generator)
        expected, start = [], 0
        for count in counts.tolist():
            expected += range(start, start + count)
            start += -(-count // align) * align
        rows, padded, num_rows = padded_rows(counts, align, int(counts.sum()))
        assert rows.tolist() == expected and padded.tolist() == [-(-c // align) * align for c in counts.tolist()]
        assert num_rows == int(counts.sum()) + 13 * (align - 1) >= start


def test_row_padding_copies_rows_once_each_way():
    """The CUDA path's padding: rows go in by one in-place index_copy_ and come out by index_select,
    whose backward is an index_add: no sort-based index_put (advanced indexing's backward), no copy of
    the padded buffer."""
    from torch.profiler import ProfilerActivity, profile

    x, counts_M, *weights = expert_inputs([30, 0, 17, 50])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        grouped_swiglu(x, counts_M, *weights, backend="grouped_mm", align_rows=8).square().sum().backward()
    ran = {event.name for event in prof.events()}
    assert "aten::index_copy_" in ran and "aten::index_select_backward" in ran
    assert not ran & {"aten::_index_put_impl_", "aten::index_put_", "aten::clone", "aten::index_copy"}


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("counts", [[3, 0, 7, 1, 9], [128, 64, 0, 200]], ids=["small", "large"])
def test_grouped_mm_on_cuda_matches_reference(counts):
    if not grouped_mm_supported(torch.bfloat16, "cuda", torch.empty(1, 32, 16)):
        pytest.skip("torch._grouped_mm missing from this torch build")
    x, counts_M, *weights = expert_inputs(counts, hidden=64, width=128, dtype=torch.bfloat16, device="cuda")
    assert resolve_expert_gemm("auto", x.dtype, x.device, weights[0], weights[2]) == "grouped_mm"
    assert expert_row_alignment("auto", x.dtype, x.device, weights[0], weights[2]) == 8
    inputs = [x, *weights]
    expected = forward_backward(lambda x, *w: per_slot_reference(x, counts_M, *w), inputs)
    actual = forward_backward(lambda x, *w: grouped_swiglu(x, counts_M, *w), inputs)
    for name, a, e in zip(["out", "grad x", "grad w_gate", "grad w_up", "grad w_down"], actual, expected):
        assert_close_relative(a, e, TOLERANCE[torch.bfloat16], f"cuda grouped_mm {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm_matches_formula(dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 32, generator=generator).to(dtype).requires_grad_()
    weight = (1 + 0.1 * torch.randn(32, generator=generator)).to(dtype).requires_grad_()

    def formula(x, weight):
        x32 = x.float()
        return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.float()

    expected = forward_backward(formula, [x, weight])
    actual = forward_backward(lambda x, w: rms_norm(x, w, 1e-5), [x, weight])
    for name, a, e in zip(["out", "grad x", "grad weight"], actual, expected):
        assert_close_relative(a, e, TOLERANCE[dtype], f"rms_norm {name}")


def test_apex_rms_norm_refused_without_apex_and_cuda():
    x = torch.randn(2, 8)
    if apex_rms_norm_available(x):
        pytest.skip("apex is usable here")
    with pytest.raises(KernelUnavailableError, match="model.rms_norm='apex' needs NVIDIA apex"):
        rms_norm(x, torch.ones(8), 1e-5, backend="apex")


@needs_cuda
@pytest.mark.gpu
def test_apex_rms_norm_matches_torch():
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    if not apex_rms_norm_available(x):
        pytest.skip("apex with CUDA extensions is not installed")
    weight = torch.rand(256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    expected = forward_backward(lambda x, w: rms_norm(x, w, 1e-5, "torch"), [x, weight])
    actual = forward_backward(lambda x, w: rms_norm(x, w, 1e-5, "apex"), [x, weight])
    for name, a, e in zip(["out", "grad x", "grad weight"], actual, expected):
        assert_close_relative(a, e, TOLERANCE[torch.bfloat16], f"apex rms_norm {name}")
    # the model's case: an fp32 residual stream and weight under bf16 autocast stay fp32, as torch's op keeps them
    x32, weight32 = (t.detach().float().requires_grad_() for t in (x, weight))
    with torch.autocast("cuda", torch.bfloat16):
        expected = forward_backward(lambda x, w: rms_norm(x, w, 1e-5, "torch"), [x32, weight32])
        actual = forward_backward(lambda x, w: rms_norm(x, w, 1e-5, "apex"), [x32, weight32])
    assert actual[0].dtype == expected[0].dtype == torch.float32
    for name, a, e in zip(["out", "grad x", "grad weight"], actual, expected):
        assert_close_relative(a, e, TOLERANCE[torch.float32], f"apex rms_norm under autocast {name}")


def attention_inputs(device="cpu", dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 16, 8, generator=generator).to(device, dtype).requires_grad_()
    k = torch.randn(2, 2, 16, 8, generator=generator).to(device, dtype).requires_grad_()
    v = torch.randn(2, 2, 16, 8, generator=generator).to(device, dtype).requires_grad_()
    return [q, k, v]


def attention_reference(q, k, v, allowed=None):
    """softmax(q k^T / sqrt(K) + causal mask) v with each key/value head serving H/G query heads, fp32; `allowed`
    ([B, 1, S, S], True: may attend) replaces the causal mask."""
    repeat = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(repeat, 1), v.float().repeat_interleave(repeat, 1)
    scores = q.float() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if allowed is None:
        allowed = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[needs_cuda, pytest.mark.gpu])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_within_documents_matches_reference(device, dtype):
    """A document mask (model.document_masking: additive, in the inputs' dtype) in place of the causal one,
    grouped heads included; on CUDA in bf16 "auto" must leave flash-attn and SDPA's flash kernel, which take
    no mask."""
    from megatron_unipool.model.documents import document_attention_mask, document_index

    inputs = attention_inputs(device, dtype)
    tokens = torch.zeros(2, 16, dtype=torch.long)
    tokens[0, [3, 4, 10]] = 1  # documents of 4, 1, 6 and 5 tokens; the second sample one document
    mask = document_attention_mask(document_index(tokens, eod_id=1), dtype).to(device)
    expected = forward_backward(lambda q, k, v: attention_reference(q, k, v, mask == 0), inputs)
    actual = forward_backward(lambda q, k, v: causal_attention(q, k, v, "auto", mask), inputs)
    for name, a, e in zip(["out", "grad q", "grad k", "grad v"], actual, expected):
        assert_close_relative(a, e, TOLERANCE[dtype], f"{device} masked {name}")
    with pytest.raises(KernelUnavailableError, match="takes no attention mask"):
        causal_attention(*inputs, "flash", mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sdpa_attention_matches_reference(dtype):
    inputs = attention_inputs(dtype=dtype)
    expected = forward_backward(attention_reference, inputs)
    actual = forward_backward(lambda q, k, v: causal_attention(q, k, v, "sdpa"), inputs)
    for name, a, e in zip(["out", "grad q", "grad k", "grad v"], actual, expected):
        assert_close_relative(a, e, TOLERANCE[dtype], f"sdpa {name}")


def test_sdpa_with_key_value_heads_repeated_matches_reference(monkeypatch):
    """Where SDPA has no fused kernel for grouped heads (CUDA in fp32, or heads over 256 wide), K and V are
    repeated per query head; forced here on CPU, the numbers and the K / V gradients summed back per group."""
    from megatron_unipool.kernels import attention

    monkeypatch.setattr(attention, "sdpa_takes_grouped_heads", lambda q, masked=False: False)
    inputs = attention_inputs()
    expected = forward_backward(attention_reference, inputs)
    actual = forward_backward(lambda q, k, v: causal_attention(q, k, v, "sdpa"), inputs)
    for name, a, e in zip(["out", "grad q", "grad k", "grad v"], actual, expected):
        assert_close_relative(a, e, TOLERANCE[torch.float32], f"repeated heads {name}")


def test_sdpa_takes_grouped_heads_only_where_a_fused_kernel_does():
    from megatron_unipool.kernels.attention import sdpa_takes_grouped_heads

    def q(dtype, head_dim, device="meta"):
        return torch.empty(1, 4, 8, head_dim, dtype=dtype, device=device)

    assert sdpa_takes_grouped_heads(q(torch.float32, 64, "cpu"))
    if torch.cuda.is_available():
        assert sdpa_takes_grouped_heads(q(torch.bfloat16, 256, "cuda"))
        assert not sdpa_takes_grouped_heads(q(torch.bfloat16, 64, "cuda"), masked=True)  # flash takes no mask
        assert not sdpa_takes_grouped_heads(q(torch.float32, 64, "cuda"))
        assert not sdpa_takes_grouped_heads(q(torch.bfloat16, 320, "cuda"))


@needs_cuda
@pytest.mark.gpu
def test_sdpa_attention_in_fp32_on_cuda_matches_reference():
    inputs = attention_inputs("cuda", torch.float32)
    expected = forward_backward(attention_reference, inputs)
    actual = forward_backward(lambda q, k, v: causal_attention(q, k, v, "sdpa"), inputs)
    for name, a, e in zip(["out", "grad q", "grad k", "grad v"], actual, expected):
        assert_close_relative(a, e, TOLERANCE[torch.float32], f"cuda fp32 sdpa {name}")


@needs_cuda
@pytest.mark.gpu
def test_flash_attention_matches_reference():
    inputs = attention_inputs("cuda", torch.bfloat16)
    if not flash_available(inputs[0]):
        pytest.skip("flash-attn is not installed")
    expected = forward_backward(attention_reference, inputs)
    actual = forward_backward(lambda q, k, v: causal_attention(q, k, v, "flash"), inputs)
    for name, a, e in zip(["out", "grad q", "grad k", "grad v"], actual, expected):
        assert_close_relative(a, e, TOLERANCE[torch.bfloat16], f"flash {name}")


def test_flash_attention_refused_where_unavailable():
    q, k, v = attention_inputs()
    with pytest.raises(KernelUnavailableError, match="model.attention='flash' needs"):
        causal_attention(q, k, v, "flash")


def test_flash_is_chosen_only_where_its_kernels_exist(monkeypatch):
    """As if flash-attn were installed: CUDA, half precision and heads up to 256 wide; else SDPA."""
    from megatron_unipool.kernels import attention

    monkeypatch.setattr(attention, "flash_attn_func", lambda *args, **kwargs: None)
    assert attention.flash_supports("cuda", torch.bfloat16, 128)
    assert attention.flash_supports("cuda", torch.float16, 256)
    assert not attention.flash_supports("cuda", torch.bfloat16, 320)
    assert not attention.flash_supports("cuda", torch.float32, 128)
    assert not attention.flash_supports("cpu", torch.bfloat16, 128)


@pytest.mark.parametrize("adamw", ["auto", "fused", "foreach"])
def test_adamw_implementations_take_the_same_steps(adamw):
    """torch's fused AdamW (the 'auto' choice, on CPU too) and its multi-tensor path against its per-tensor
    loop, over the same decay groups."""
    config = TrainConfig(lr=1e-2, weight_decay=0.1, adamw=adamw)

    def train(build):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        optimizer = build(model)
        for step in range(3):
            optimizer.zero_grad()
            model(torch.randn(5, 8, generator=torch.Generator().manual_seed(step))).square().mean().backward()
            optimizer.step()
        return optimizer, [p.detach().clone() for p in model.parameters()]

    _, reference = train(lambda model: torch.optim.AdamW(
        decay_groups(model, config), lr=config.lr, betas=(config.beta1, config.beta2), eps=config.adam_eps,
        foreach=False))
    optimizer, params = train(lambda model: build_optimizer(model, config))
    assert optimizer.defaults["foreach" if adamw == "foreach" else "fused"]
    for p, r in zip(params, reference):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


def test_apex_adamw_refused_without_apex():
    try:
        import apex.optimizers  # noqa: F401
        pytest.skip("apex is installed")
    except ImportError:
        pass
    with pytest.raises(KernelUnavailableError, match="train.adamw='apex' needs NVIDIA apex"):
        build_optimizer(torch.nn.Linear(2, 2), TrainConfig(adamw="apex"))


def small_model(kind="unipool", moe_overrides=None, **model_overrides):
    torch.manual_seed(0)
    model = ModelConfig(num_layers=3, hidden_size=16, num_heads=2, num_kv_heads=1, ffn_hidden_size=32, vocab_size=40,
                        seq_len=12, init_std=0.1, **model_overrides)
    moe = MoEConfig(kind=kind, num_experts=4, top_k=2, router="softmax",
                    aux_loss="pool" if kind == "unipool" else "layer", z_loss_coeff=1e-3,
                    shared_expert_ffn_hidden_size=8 if kind == "vanilla" else 0, **(moe_overrides or {}))
    return LanguageModel(model, moe)


def loss_and_gradients(model, tokens):
    model.zero_grad()
    logits, losses = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + sum(losses.values())
    loss.backward()
    counts = [stats.step_counts.clone() for stats in model.pool_stats]
    for stats in model.pool_stats:
        stats.end_step()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, counts


@pytest.mark.parametrize("mode", ["attention", "ffn", "block"])
@pytest.mark.parametrize("kind", ["unipool", "vanilla", "dense"])
def test_activation_checkpointing_changes_nothing_but_memory(kind, mode):
    """Same loss, same gradients, and routing counted once per forward although it is recomputed."""
    tokens = torch.randint(0, 40, (3, 13), generator=torch.Generator().manual_seed(1))
    reference, model = small_model(kind), small_model(kind, activation_checkpointing=mode)
    expected = [loss_and_gradients(reference, tokens) for _ in range(2)][-1]  # 2nd step: pool aux loss active
    actual = [loss_and_gradients(model, tokens) for _ in range(2)][-1]
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-6, atol=0)
    assert actual[1].keys() == expected[1].keys()
    for name in expected[1]:
        torch.testing.assert_close(actual[1][name], expected[1][name], rtol=1e-5, atol=1e-7, msg=name)
    for a, e in zip(actual[2], expected[2]):
        assert torch.equal(a, e)
        assert int(a.sum()) == 3 * 12 * 2 * a.shape[0]  # tokens x k per MoE layer, once


@pytest.mark.parametrize("kind", ["unipool", "vanilla"])
def test_model_with_grouped_mm_experts_matches_loop(kind):
    tokens = torch.randint(0, 40, (3, 13), generator=torch.Generator().manual_seed(1))
    expected = loss_and_gradients(small_model(kind, expert_gemm="loop"), tokens)
    actual = loss_and_gradients(small_model(kind, expert_gemm="grouped_mm"), tokens)
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=0)
    for name in expected[1]:
        torch.testing.assert_close(actual[1][name], expected[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("checkpointing", ["none", "ffn", "block"])
@pytest.mark.parametrize("gemm", ["loop", "grouped_mm"])
@pytest.mark.parametrize("layers_per_pool", [None, 2], ids=["one_pool", "pools_of_2_and_1"])
def test_deferred_pool_weight_gradients_change_nothing_but_speed(layers_per_pool, gemm, checkpointing, monkeypatch):
    """model.pool_weight_gradients: one weight-gradient pass per pool gives every layer-by-layer
    loss and gradient, under activation checkpointing too (recomputed forwards defer nothing)."""
    deferred_calls = []
    for method, gemm_of_call in (("add_slices", "loop"), ("add_rows", "grouped_mm")):
        add = getattr(DeferredWeightGradients, method)
        monkeypatch.setattr(DeferredWeightGradients, method,
                            lambda self, *a, add=add, gemm_of_call=gemm_of_call: deferred_calls.append(gemm_of_call) or add(self, *a))
    tokens = torch.randint(0, 40, (3, 13), generator=torch.Generator().manual_seed(1))
    options = dict(moe_overrides={"layers_per_pool": layers_per_pool}, expert_gemm=gemm,
                   activation_checkpointing=checkpointing)
    per_layer = small_model(pool_weight_gradients="per_layer", **options)
    deferred = small_model(pool_weight_gradients="deferred", **options)
    for _ in range(2):  # 2nd step: the pool aux loss is active
        expected = loss_and_gradients(per_layer, tokens)
        assert not deferred_calls
        actual = loss_and_gradients(deferred, tokens)
        assert deferred_calls == [gemm] * (layers_per_pool or 3)  # every layer of the shared pool, none of the other
        deferred_calls.clear()
        torch.testing.assert_close(actual[0], expected[0], rtol=1e-6, atol=0)
        assert actual[1].keys() == expected[1].keys()
        for name in expected[1]:
            torch.testing.assert_close(actual[1][name], expected[1][name], rtol=1e-5, atol=1e-7, msg=name)


def check_deferred_weight_gradients(case: str, dtype, device="cpu", hidden=16, width=24):
    """Three calls on the same experts, routed differently (experts unused by some calls): the
    weight gradients arrive once, equal to the per-slot reference summed over the calls."""
    routings = [[3, 0, 7, 1, 9], [0, 5, 0, 0, 2], [4, 4, 4, 4, 4]]
    _, _, *weights = expert_inputs(routings[0], hidden, width, dtype, device)
    xs = [expert_inputs(counts, hidden, width, dtype, device, seed=1 + i)[0] for i, counts in enumerate(routings)]
    counts = [torch.tensor(c, device=device) for c in routings]

    def calls(reference):
        def run(*inputs):
            *xs, w_gate, w_up, w_down = inputs
            x_all = torch.cat(xs)
            deferred = None
            if not reference:
                deferred = case_collector(case)
                x_all = deferred.attach(x_all, w_gate, w_up, w_down)
            outs = []
            for x, c in zip(x_all.split([len(x) for x in xs]), counts):
                if reference:
                    outs.append(per_slot_reference(x, c, w_gate, w_up, w_down))
                else:
                    outs.append(grouped_swiglu(x, c, w_gate, w_up, w_down, deferred=deferred, **GEMM_CASES[case]))
            return torch.cat(outs)
        return run

    accumulated = []
    weights[0].register_post_accumulate_grad_hook(lambda p: accumulated.append(p.grad.clone()))
    expected = forward_backward(calls(reference=True), [*xs, *weights])
    accumulated.clear()
    actual = forward_backward(calls(reference=False), [*xs, *weights])
    names = ["out"] + [f"grad x{i}" for i in range(len(xs))] + ["grad w_gate", "grad w_up", "grad w_down"]
    for name, a, e in zip(names, actual, expected):
        assert_close_relative(a, e, TOLERANCE[dtype], f"{case} {name}")
    assert len(accumulated) == 1  # one gradient event per backward, whatever the number of calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_deferred_weight_gradients_sum_every_call(case, dtype):
    check_deferred_weight_gradients(case, dtype, case_device(case))


@needs_cuda
@pytest.mark.gpu
def test_deferred_weight_gradients_on_cuda():
    """The CUDA path: grouped_mm (CUTLASS) with its row padding, rows regrouped on the device."""
    if not grouped_mm_supported(torch.bfloat16, "cuda", torch.empty(1, 32, 16)):
        pytest.skip("torch._grouped_mm missing from this torch build")
    # grouped_mm pads each expert's rows itself on CUDA (expert_row_alignment)
    check_deferred_weight_gradients("grouped_mm", torch.bfloat16, "cuda", hidden=64, width=128)


@pytest.mark.parametrize("dtype,width,columns,words", [
    (torch.bfloat16, 12, slice(None), True), (torch.float32, 6, slice(None), True),
    (torch.bfloat16, 3, slice(None), False),  # 6-byte rows
    (torch.bfloat16, 9, slice(1, 5), False),  # rows starting 2 bytes into the storage
    (torch.float64, 4, slice(None), False)])
def test_regrouped_rows_are_the_bytes_index_copy_places(monkeypatch, dtype, width, columns, words):
    """The regrouping's row copy, part by part: every row where the destination says, identical to index_copy_
    of the parts concatenated (NaN payloads too), as 8-byte words exactly where both layouts allow it; each
    part released once copied."""
    from megatron_unipool.kernels.grouped_gemm import regroup_rows

    generator = torch.Generator().manual_seed(0)
    rows = (torch.randn(7, width, generator=generator).to(dtype))[:, columns]
    rows[1, 0] = float("nan")
    destination = torch.tensor([6, 0, 3, 2, 5, 1, 4])
    expected = torch.zeros(7, rows.shape[1], dtype=dtype).index_copy_(0, destination, rows)
    copied_as = []
    index_copy = torch.Tensor.index_copy_
    monkeypatch.setattr(torch.Tensor, "index_copy_", lambda t, *a: copied_as.append(t.dtype) or index_copy(t, *a))
    parts = [rows[:4], rows[4:]]
    actual = regroup_rows(parts, destination.split([4, 3]))
    assert parts == []
    assert torch.equal(actual.view(torch.uint8), expected.view(torch.uint8))
    assert copied_as == [torch.int64 if words else dtype] * 2


def test_deferred_weight_gradients_without_rows_are_zeros():
    """No call had a row on this rank: the weights still get a (zero) gradient, as on every other rank."""
    x, counts_M, *weights = expert_inputs([0, 0, 0])
    deferred = DeferredWeightGradients()
    grouped_swiglu(deferred.attach(x, *weights), counts_M, *weights, deferred=deferred).sum().backward()
    assert all(w.grad is not None and not w.grad.any() for w in weights)


# (Triton's: the weight-gradient kernel sums in fp32 by construction, tests/test_segmented_gemm.py; 128 interpreted
# calls would take half a minute)
@pytest.mark.parametrize("case", [case for case in GEMM_CASES if case != "triton"])
def test_deferred_sum_over_many_bf16_calls_keeps_fp32_precision(case):
    """64 calls (layers) under bf16 autocast: the deferred weight gradient equals the fp32 sum of the
    calls' own gradients, as per-layer accumulation into the fp32 .grad gives. The loop sums in fp32
    (summing in bf16, rounded after every call, was 1e-2 off); one grouped_mm over every call's rows
    rounds its total once to bf16 (its output dtype), as one layer's own gradient is."""
    x0, counts_M, *weights = expert_inputs([4, 0, 4])
    xs = [expert_inputs([4, 0, 4], seed=1 + i)[0].detach() for i in range(64)]

    def gradients(deferred: bool):
        for w in weights:
            w.grad = None
        anchor = torch.zeros((), requires_grad=True)
        collector = DeferredWeightGradients() if deferred else None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if deferred:
                anchor = collector.attach(anchor, *weights)
            outs = [grouped_swiglu(x + anchor, counts_M, *weights, deferred=collector, **GEMM_CASES[case]) for x in xs]
        sum(out.float().sum() for out in outs).backward()
        return [w.grad.double() for w in weights]

    expected = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    for x in xs:  # each call's gradient on its own, summed exactly
        for w in weights:
            w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = grouped_swiglu(x, counts_M, *weights, **GEMM_CASES[case])
        out.float().sum().backward()
        for total, w in zip(expected, weights):
            total += w.grad.double()
    tolerance = 1e-5 if GEMM_CASES[case]["backend"] == "loop" else 2 ** -8
    for name, actual, total in zip(["w_gate", "w_up", "w_down"], gradients(deferred=True), expected):
        assert_close_relative(actual, total, tolerance, f"{case} {name}")


@pytest.mark.parametrize("case", CASES)
def test_a_backward_that_stops_short_of_the_anchor_leaves_nothing_behind(case):
    """torch.autograd.grad to an intermediate tensor runs the calls' backward but not the anchor's:
    the operands it collected must not be counted again by the next, full backward."""
    x, counts_M, *weights = expert_inputs([2, 0, 3], hidden=8, width=8, device=case_device(case))

    def forward(collector):
        start = collector.attach(x, *weights) if collector else x
        first = grouped_swiglu(start, counts_M, *weights, deferred=collector, **GEMM_CASES[case])
        return first, grouped_swiglu(first, counts_M, *weights, deferred=collector, **GEMM_CASES[case])

    _, out = forward(None)
    expected = torch.autograd.grad(out.sum(), weights)
    collector = case_collector(case)
    first, out = forward(collector)
    torch.autograd.grad(out.sum(), first, retain_graph=True)  # stops at `first`: no anchor in this pass
    out.sum().backward()
    for name, w, e in zip(["w_gate", "w_up", "w_down"], weights, expected):
        assert_close_relative(w.grad, e, 1e-6, f"{case} {name}")


@pytest.mark.parametrize("case", CASES)
def test_a_call_whose_output_is_unused_adds_nothing(case, monkeypatch):
    """Of three deferred calls, the loss uses two: the third's backward never runs, so its rows among
    the gathered operands are never written; they must add nothing (buffers start as NaN here)."""
    new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda t, *a, **kw: (
        lambda out: out.fill_(float("nan")) if out.is_floating_point() else out)(new_empty(t, *a, **kw)))
    routings, device = [[3, 0, 5], [2, 4, 2], [0, 6, 2]], case_device(case)
    _, _, *weights = expert_inputs(routings[0], hidden=8, width=16, device=device)
    xs = [expert_inputs(c, hidden=8, width=16, device=device, seed=1 + i)[0].detach() for i, c in enumerate(routings)]
    counts = [torch.tensor(c, device=device) for c in routings]
    expected = [torch.zeros_like(w) for w in weights]
    for x, c in (zip(xs[::2], counts[::2])):
        for total, grad in zip(expected, torch.autograd.grad(grouped_swiglu(x, c, *weights, **GEMM_CASES[case]).sum(), weights)):
            total += grad
    collector = case_collector(case)
    anchor = collector.attach(torch.zeros((), device=device), *weights)
    outs = [grouped_swiglu(x + anchor, c, *weights, deferred=collector, **GEMM_CASES[case]) for x, c in zip(xs, counts)]
    actual = torch.autograd.grad(outs[0].sum() + outs[2].sum(), weights)
    for name, a, e in zip(["w_gate", "w_up", "w_down"], actual, expected):
        assert_close_relative(a, e, 1e-6, f"{case} {name}")


def test_tf32_linear_is_linear_with_tf32_switched_on_around_its_three_gemms(monkeypatch):
    """Forward and both gradients as F.linear's; each GEMM runs with fp32_precision 'tf32' (a no-op off
    CUDA), which is restored afterwards."""
    from megatron_unipool.kernels import tf32_linear

    matmul = torch.backends.cuda.matmul
    precision_at_gemm = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a: precision_at_gemm.append(matmul.fp32_precision) or mm(*a))
    before = matmul.fp32_precision
    generator = torch.Generator().manual_seed(0)
    x, w = (torch.randn(shape, generator=generator).to(DEVICE) for shape in ((37, 16), (6, 16)))
    results = []
    for linear in (tf32_linear, F.linear):
        leaves = [t.clone().requires_grad_() for t in (x, w)]
        out = linear(*leaves)
        (out * torch.linspace(-1, 1, 6, device=DEVICE)).sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves])
    assert precision_at_gemm == ["tf32"] * 3 and matmul.fp32_precision == before
    # TF32 rounds the inputs to 10 mantissa bits: entries near zero lose most, relative to the largest entry
    tolerance = 2e-3 if DEVICE == "cuda" else 1e-6
    for name, ours, expected in zip(["out", "grad x", "grad w"], *results):
        assert_close_relative(ours, expected, tolerance, f"tf32_linear {name}")


def test_router_tf32_routes_through_tf32_linear(monkeypatch):
    """moe.router_tf32: the logits come from tf32_linear (off CUDA the same numbers as fp32)."""
    from megatron_unipool.moe import router as router_module

    calls = []
    tf32 = router_module.tf32_linear
    monkeypatch.setattr(router_module, "tf32_linear", lambda *a: calls.append(1) or tf32(*a))
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(0))
    routings = []
    for router_tf32 in (True, False):
        torch.manual_seed(0)
        router = Router(16, 8, MoEConfig(router="norm", top_k=2, router_tf32=router_tf32), 0.1)
        routings.append(router(x))
    assert len(calls) == 1
    assert torch.equal(routings[0].indices_TK, routings[1].indices_TK)
    torch.testing.assert_close(routings[0].gates_TK, routings[1].gates_TK, rtol=1e-6, atol=1e-7)


def test_apex_without_its_cuda_extension_is_not_picked(monkeypatch):
    """apex imports fused_layer_norm_cuda at its first call: an apex built without --cuda_ext must be
    found out at import, or 'auto' would pick it and fail in the first forward (stub modules here)."""
    import importlib
    import sys
    import types

    module = importlib.import_module("megatron_unipool.kernels.rms_norm")
    fused = types.ModuleType("apex.normalization.fused_layer_norm")
    fused.fused_rms_norm_affine = lambda *args: None
    for name, stub in [("apex", types.ModuleType("apex")), ("apex.normalization", types.ModuleType("apex.normalization")),
                       ("apex.normalization.fused_layer_norm", fused)]:
        monkeypatch.setitem(sys.modules, name, stub)
    try:
        monkeypatch.setitem(sys.modules, "fused_layer_norm_cuda", None)  # not built: importing it fails
        assert importlib.reload(module).fused_rms_norm_affine is None
        monkeypatch.setitem(sys.modules, "fused_layer_norm_cuda", types.ModuleType("fused_layer_norm_cuda"))
        assert importlib.reload(module).fused_rms_norm_affine is fused.fused_rms_norm_affine
    finally:
        monkeypatch.undo()
        importlib.reload(module)


def test_sharding_a_frozen_pool_keeps_it_frozen():
    from megatron_unipool.moe import ExpertPool

    pool = ExpertPool(4, 8, 16, 0.02, 0.02)
    pool.requires_grad_(False)
    pool.shard_(1, 2, None)
    assert all(not w.requires_grad and w.shape[0] == 2 for w in (pool.w_gate, pool.w_up, pool.w_down))


def test_a_pool_shard_owns_only_its_experts_memory():
    """The shard is a copy, not a view: the full pool's storage is freed and checkpoints save the shard."""
    from megatron_unipool.moe import ExpertPool

    pool = ExpertPool(4, 8, 16, 0.02, 0.02)
    pool.shard_(0, 2, None)
    for w in (pool.w_gate, pool.w_up, pool.w_down):
        assert w.untyped_storage().nbytes() == w.numel() * w.element_size()


def test_rotary_embedding_keeps_the_input_dtype():
    """A bf16 model run without autocast must get bf16 queries and keys, matching the fp32 rotation."""
    from megatron_unipool.model.rope import RotaryEmbedding

    rope = RotaryEmbedding(head_dim=8, max_seq_len=16, base=10000.0)
    x = torch.randn(1, 5, 2, 8)
    rotated = rope(x.bfloat16())
    assert rotated.dtype == torch.bfloat16
    torch.testing.assert_close(rotated.float(), rope(x), rtol=2e-2, atol=2e-2)


def saved_activation_bytes(model, tokens) -> int:
    """Bytes autograd keeps for backward during one forward (parameters excluded)."""
    parameters = {p.data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.data_ptr() not in parameters:
            saved[(t.data_ptr(), t.shape)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens)
    return sum(saved.values())


@pytest.mark.parametrize("gemm", ["loop", "grouped_mm"])
def test_deferred_pool_weight_gradients_under_bf16_autocast(gemm):
    """bf16 autocast: the shared pool is cast once per forward (autograd keeps one bf16 copy, not one
    per layer), and the fp32 master weights get the layer-by-layer gradients."""
    tokens = torch.randint(0, 40, (3, 13), generator=torch.Generator().manual_seed(1))
    models = {mode: small_model(pool_weight_gradients=mode, expert_gemm=gemm) for mode in ["per_layer", "deferred"]}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        saved = {mode: saved_activation_bytes(model, tokens[:, :-1]) for mode, model in models.items()}
        expected, actual = (loss_and_gradients(models[mode], tokens) for mode in ["per_layer", "deferred"])
    pool = models["deferred"].expert_pools[0]
    pool_bf16_bytes = 2 * sum(w.numel() for w in (pool.w_gate, pool.w_up, pool.w_down))
    assert saved["per_layer"] - saved["deferred"] == (3 - 1) * pool_bf16_bytes
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-2, atol=0)
    for name in expected[1]:
        assert actual[1][name].dtype == torch.float32
        assert_close_relative(actual[1][name], expected[1][name], 3e-2, name)


def test_activation_checkpointing_stores_less():
    tokens = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(1))
    saved = {mode: saved_activation_bytes(small_model("unipool", activation_checkpointing=mode), tokens)
             for mode in ["none", "attention", "ffn", "block"]}
    assert saved["block"] < saved["ffn"] < saved["none"], saved
    assert saved["attention"] < saved["none"], saved


@pytest.mark.parametrize("case", CASES)
def test_grouped_swiglu_under_autocast_computes_in_bf16_with_fp32_gradients(case):
    x, counts_M, *weights = expert_inputs([3, 0, 7, 1, 9], device=case_device(case))
    expected = forward_backward(lambda x, *w: per_slot_reference(x, counts_M, *w), [x, *weights])

    def autocast_forward(x, *w):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = grouped_swiglu(x, counts_M, *w, **GEMM_CASES[case])
        assert out.dtype == torch.bfloat16
        return out

    actual = forward_backward(autocast_forward, [x, *weights])
    assert all(t.grad.dtype == torch.float32 for t in [x, *weights])
    for name, a, e in zip(["out", "grad x", "grad w_gate", "grad w_up", "grad w_down"], actual, expected):
        assert_close_relative(a, e, TOLERANCE[torch.bfloat16], f"autocast {case} {name}")
