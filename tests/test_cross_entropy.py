"""The Triton cross-entropy against F.cross_entropy in fp32: losses, gradients, dtypes, layouts.

On CUDA the compiled kernel runs; on a CPU machine with Triton installed, Triton's interpreter
(TRITON_INTERPRET=1) runs the same kernel source, so the arithmetic and the indexing are checked
here too.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_unipool.kernels import KernelUnavailableError, cross_entropy_sum
from megatron_unipool.kernels import cross_entropy as ce_module
from megatron_unipool.kernels import triton_support
from megatron_unipool.training import Trainer
from kernel_models import DEVICE

pytestmark = pytest.mark.usefixtures("single_thread")  # the kernel's tests skip without Triton (triton_runs)

CUDA = DEVICE == "cuda"


def logits_and_targets(rows, vocab, dtype, scale=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=generator) * scale).to(DEVICE, dtype)
    targets = torch.randint(0, vocab, (rows,), generator=generator).to(DEVICE)
    return logits, targets


def losses_and_gradient(fn, logits, row_weights):
    logits = logits.detach().clone().requires_grad_()
    losses = fn(logits)
    (losses * row_weights).sum().backward()
    return losses.detach(), logits.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab,block", [(1000, 256), (320, None), (4099, 1024)])
def test_kernel_matches_fp32_cross_entropy(dtype, vocab, block, triton_runs):
    """Per-row losses and the gradient under arbitrary per-row weights, over several blocks per row
    (a vocabulary that is not a multiple of the block) and one; the gradient has the logits' dtype."""
    logits, targets = logits_and_targets(23, vocab, dtype)
    row_weights = torch.linspace(-2, 3, 23, device=DEVICE)
    ours = losses_and_gradient(lambda x: ce_module.TritonCrossEntropy.apply(x, targets, block), logits, row_weights)
    reference = losses_and_gradient(lambda x: F.cross_entropy(x.float(), targets, reduction="none"), logits,
                                    row_weights)
    assert ours[1].dtype == dtype
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-5, atol=1e-5)
    # the reference rounds its fp32 gradient to bf16 once too: at most one bf16 step apart
    torch.testing.assert_close(ours[1].float(), reference[1].float(),
                               **({"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-5}))


def test_extreme_logits_and_strided_rows(triton_runs):
    """Logits of +-1e4 (exp overflows without the max shift) in rows of a wider tensor (row stride > V).
    In the first rows the target is the largest logit and another is close behind: a small loss that must
    keep fp32's precision of the logits' differences, as log_softmax does (a log-sum-exp added up in one
    fp32 number would be off by its ulp at 1e4, about 1e-3, in the loss and in each exponent)."""
    wide, targets = logits_and_targets(9, 700, torch.float32, scale=1e4)
    targets = torch.stack([targets % 500, targets], 1)[:, 0]  # strided too: every other element of a buffer
    assert not targets.is_contiguous()
    for row, gap in enumerate((0.5, 2.0, 0.1)):
        top = wide[row, :500].max()
        wide[row, targets[row]] = top + 1
        wide[row, (targets[row] + 1) % 500] = top + 1 - gap
    row_weights = torch.ones(9, device=DEVICE)
    ours = losses_and_gradient(lambda x: ce_module.TritonCrossEntropy.apply(x[:, :500], targets, 128),
                               wide, row_weights)
    reference = losses_and_gradient(lambda x: F.cross_entropy(x[:, :500], targets, reduction="none"), wide,
                                    row_weights)
    assert torch.isfinite(ours[0]).all()
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1], reference[1], rtol=1e-5, atol=1e-6)


def test_rows_that_open_with_a_block_of_minus_infinity(triton_runs):
    """Masked logits (-inf) filling a row's first block, or the middle one: the online sum starts from
    no finite logit, which must not make it NaN."""
    logits, targets = logits_and_targets(3, 64, torch.float32)
    logits[0, :20] = float("-inf")  # the whole first block of 16
    logits[1, 16:32] = float("-inf")
    targets[:2] = torch.tensor([40, 50])
    row_weights = torch.ones(3, device=DEVICE)
    ours = losses_and_gradient(lambda x: ce_module.TritonCrossEntropy.apply(x, targets, 16), logits, row_weights)
    reference = losses_and_gradient(lambda x: F.cross_entropy(x, targets, reduction="none"), logits, row_weights)
    assert torch.isfinite(ours[0]).all()
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], reference[1], rtol=1e-5, atol=1e-6)


def test_sum_matches_fp32_cross_entropy(triton_runs):
    """cross_entropy_sum: the kernel's sum equals F.cross_entropy's (sum reduction, the trainer's)."""
    logits, targets = logits_and_targets(31, 333, torch.bfloat16)
    reference = F.cross_entropy(logits.float(), targets, reduction="sum")
    for backend in ("triton", "torch"):
        torch.testing.assert_close(cross_entropy_sum(logits, targets, backend), reference, rtol=1e-5, atol=1e-4)


def test_a_target_outside_the_vocabulary_gives_nan_not_a_wrong_loss(triton_runs):
    logits, targets = logits_and_targets(4, 64, torch.float32)
    targets[2] = 64
    losses = ce_module.TritonCrossEntropy.apply(logits, targets)
    assert torch.isnan(losses[2]) and torch.isfinite(losses[[0, 1, 3]]).all()


@pytest.mark.skipif(CUDA, reason="checks the CPU fallback")
def test_on_a_cpu_auto_takes_torch_and_triton_needs_the_interpreter(monkeypatch):
    logits, targets = logits_and_targets(5, 40, torch.float32)
    monkeypatch.setattr(ce_module.TritonCrossEntropy, "apply", None)  # auto must not reach for it, interpreter or not
    torch.testing.assert_close(cross_entropy_sum(logits, targets, "auto"),
                               F.cross_entropy(logits, targets, reduction="sum"), rtol=0, atol=0)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelUnavailableError, match="train.cross_entropy='triton'"):
        cross_entropy_sum(logits, targets, "triton")
    monkeypatch.setattr(triton_support, "triton", None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(KernelUnavailableError, match="needs Triton"):
        cross_entropy_sum(logits, targets, "triton")


def test_training_step_with_the_kernel_equals_the_torch_loss(tiny_config, tmp_path, triton_runs, monkeypatch):
    """The trainer's loss and every gradient are the same with train.cross_entropy triton and torch,
    and the setting decides which runs (the kernel once per micro-batch, or not at all)."""
    calls = []
    apply = ce_module.TritonCrossEntropy.apply
    monkeypatch.setattr(ce_module.TritonCrossEntropy, "apply", lambda *args: calls.append(1) or apply(*args))
    results = []
    for backend in ("triton", "torch"):
        trainer = Trainer(tiny_config("configs/tiny_unipool_cpu.json", f"train.cross_entropy={backend}",
                                      "train.global_batch=8", "train.micro_batch=4"), tmp_path / backend)
        calls.clear()
        totals = trainer.compute_gradients()
        assert len(calls) == (2 if backend == "triton" else 0)
        results.append((totals, {name: p.grad.clone() for name, p in trainer.model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, rtol=1e-4, atol=1e-7, msg=name)
