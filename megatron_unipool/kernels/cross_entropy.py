"""Language-model cross-entropy: a Triton kernel when Triton is importable (on CUDA), else
`F.cross_entropy` over the logits upcast to fp32.

The eager path makes the vocabulary-sized tensors several times over: an fp32 copy of the bf16
logits, log-softmax's output, its gradient and the gradient's cast back to bf16. On an H200 that
was 9-12% of a 182M model's device time at 32 x 1024 tokens per micro-batch (docs/benchmarks.md).
The kernel reads the logits once in forward (an online max and sum of exponentials per row, in
fp32: Milakov & Gimelshein's online softmax) and keeps each row's max and log of the shifted sum apart,
as log_softmax does: their fp32 sum would lose the low bits of large logits (an ulp of 1e-3 at 1e4).
Backward reads the logits again and writes the gradient, softmax - onehot times the incoming gradient,
computed in fp32 and rounded once to the logits' dtype. The same numbers as the eager path up to that
rounding.

A target outside the vocabulary gives that row a NaN loss (the eager path raises instead, except for
-100, F.cross_entropy's ignore_index, whose row it drops; targets here are token ids, never negative).
`"triton"` also runs in Triton's interpreter on a CPU (`triton_support`); `"auto"` takes the kernel
on CUDA only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .triton_support import tl, triton, triton_runs_on, wants_triton

MAX_BLOCK = 32768  # vocabulary entries a program holds at once (fp32 in registers: 32 per thread at 32 warps)


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Sum over rows of -log softmax(logits)[target], in fp32. logits [N, V], targets [N]."""
    if (wants_triton(backend, logits, "train.cross_entropy")
            or (backend == "auto" and logits.is_cuda and triton_runs_on(logits))):
        return TritonCrossEntropy.apply(logits, targets).sum()
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def block_size(vocab: int) -> int:
    return min(MAX_BLOCK, triton.next_power_of_2(vocab))


if triton is not None:  # the kernels exist only where Triton does
    @triton.jit
    def _cross_entropy_forward_kernel(logits_ptr, row_stride, targets_ptr, losses_ptr, row_stats_ptr, vocab,
                                      BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * row_stride
        running_max = float("-inf")
        running_sum = 0.0
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            # while every logit so far is -inf, shift by 0: exp(-inf - -inf) would make the sum NaN
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), axis=0)
            running_max = new_max
        log_sum = tl.log(running_sum)
        target = tl.load(targets_ptr + row)
        inside = (target >= 0) & (target < vocab)
        target_logit = tl.load(row_ptr + target, mask=inside, other=float("nan")).to(tl.float32)
        tl.store(row_stats_ptr + 2 * row, running_max)
        tl.store(row_stats_ptr + 2 * row + 1, log_sum)
        tl.store(losses_ptr + row, (running_max - target_logit) + log_sum)

    @triton.jit
    def _cross_entropy_backward_kernel(logits_ptr, row_stride, targets_ptr, row_stats_ptr, grad_losses_ptr,
                                       grad_losses_stride, grad_ptr, grad_row_stride, vocab, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * row_stride
        grad_row_ptr = grad_ptr + row * grad_row_stride
        target = tl.load(targets_ptr + row)
        row_max = tl.load(row_stats_ptr + 2 * row)
        log_sum = tl.load(row_stats_ptr + 2 * row + 1)
        scale = tl.load(grad_losses_ptr + row * grad_losses_stride).to(tl.float32)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < vocab
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp((x - row_max) - log_sum) - tl.where(cols == target, 1.0, 0.0)
            tl.store(grad_row_ptr + cols, (grad * scale).to(grad_ptr.dtype.element_ty), mask=mask)


class TritonCrossEntropy(torch.autograd.Function):
    """Per-row losses [N] (fp32) of logits [N, V]; keeps the logits and each row's max and log-sum [N, 2]."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, block: int | None = None) -> torch.Tensor:
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        targets = targets.contiguous()
        rows, vocab = logits.shape
        block = block or block_size(vocab)
        losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
        row_stats = torch.empty(rows, 2, dtype=torch.float32, device=logits.device)
        _cross_entropy_forward_kernel[(rows,)](logits, logits.stride(0), targets, losses, row_stats, vocab,
                                               BLOCK=block, num_warps=_warps(block))
        ctx.save_for_backward(logits, targets, row_stats)
        ctx.block = block
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        logits, targets, row_stats = ctx.saved_tensors
        rows, vocab = logits.shape
        grad = torch.empty_like(logits)
        _cross_entropy_backward_kernel[(rows,)](logits, logits.stride(0), targets, row_stats, grad_losses,
                                                grad_losses.stride(0), grad, grad.stride(0), vocab, BLOCK=ctx.block,
                                                num_warps=_warps(ctx.block))
        return grad, None, None


def _warps(block: int) -> int:
    return max(1, min(32, block // 1024))
