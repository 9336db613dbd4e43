"""Pipeline parallelism: point-to-point activation transfer and the 1F1B schedule.

Our own non-interleaved 1F1B (Megatron's `forward_backward_pipelining_without_interleaving`)
rather than DeepSpeed's PipelineEngine: the shared pool is used by layers on every stage, its
gradients must be summed over stages before the optimizer step, and each stage's MoE losses
join the backward where they arise. Stage s runs pp - s - 1 warm-up forwards, then alternates
one forward and one backward, then drains; at most pp micro-batches are alive per stage.
Paired send/receive use batched isend/irecv, so neighbours never deadlock.

With one stage the schedule is plain gradient accumulation: forward then backward per micro-batch.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from .state import ParallelState

# forward_step(micro_batch_index, input activation or None on the first stage)
#   -> (activation for the next stage or None on the last, this stage's loss share or None)
ForwardStep = Callable[[int, Optional[torch.Tensor]], tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]
Backward = Callable[[torch.Tensor], None]


class StageChannel:
    """Sends and receives activations and their gradients between neighbouring stages."""

    def __init__(self, state: ParallelState, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        L = state.layout
        tp, dp, pp = L.coordinates(L.rank)
        self.prev = L.rank_of(tp, dp, pp - 1) if pp > 0 else None
        self.next = L.rank_of(tp, dp, pp + 1) if pp < L.pp - 1 else None
        self.stages_after = L.pp - 1 - pp  # the warm-up depth of 1F1B
        self.shape, self.dtype, self.device = shape, dtype, device

    @property
    def first(self) -> bool:
        return self.prev is None

    @property
    def last(self) -> bool:
        return self.next is None

    def _exchange(self, send: Optional[torch.Tensor], send_to: Optional[int], recv_from: Optional[int]):
        ops, received = [], None
        if send is not None and send_to is not None:
            ops.append(dist.P2POp(dist.isend, send.detach().contiguous(), send_to))
        if recv_from is not None:
            received = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, received, recv_from))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        return received

    def recv_forward(self):
        return self._exchange(None, None, self.prev)

    def send_forward(self, y):
        self._exchange(y, self.next, None)

    def recv_backward(self):
        return self._exchange(None, None, self.next)

    def send_backward(self, grad):
        self._exchange(grad, self.prev, None)

    def send_forward_recv_backward(self, y):
        return self._exchange(y, self.next, self.next)

    def send_backward_recv_forward(self, grad):
        return self._exchange(grad, self.prev, self.prev)


def _backward(x, y, loss, grad_y, backward: Backward) -> Optional[torch.Tensor]:
    """Backpropagate this stage's part: the gradient from the next stage and the local loss share.

    Both go into one scalar, sum(y * grad_y) + loss, whose gradient is exactly theirs, so an
    engine that only backpropagates scalar losses (DeepSpeed's) can run it.
    """
    scalar = None
    if y is not None:
        scalar = (y * grad_y).sum()
    if loss is not None and loss.requires_grad:
        scalar = loss if scalar is None else scalar + loss
    if scalar is not None:
        backward(scalar)
    return None if x is None else x.grad


def _forward(forward_step: ForwardStep, index: int, x):
    if x is not None:
        x.requires_grad_(True)
    return forward_step(index, x)


def one_forward_one_backward(num_micro_batches: int, forward_step: ForwardStep, channel: StageChannel,
                             backward: Backward = torch.Tensor.backward) -> None:
    """Run forward and backward of every micro-batch on this stage in 1F1B order; `backward(scalar)`
    backpropagates one micro-batch."""
    warmup = min(channel.stages_after, num_micro_batches)
    alive: list[tuple] = []
    for i in range(warmup):
        x = channel.recv_forward()
        y, loss = _forward(forward_step, i, x)
        channel.send_forward(y)
        alive.append((x, y, loss))
    remaining = num_micro_batches - warmup
    x = channel.recv_forward() if remaining else None
    for j in range(remaining):
        y, loss = _forward(forward_step, warmup + j, x)
        grad_y = channel.send_forward_recv_backward(y) if not channel.last else None
        alive.append((x, y, loss))
        grad_x = _backward(*alive.pop(0), grad_y, backward)
        if j == remaining - 1:
            channel.send_backward(grad_x)
        else:
            x = channel.send_backward_recv_forward(grad_x)
    for _ in range(warmup):
        old = alive.pop(0)
        grad_x = _backward(*old, channel.recv_backward(), backward)
        channel.send_backward(grad_x)


def forward_only(num_micro_batches: int, forward_step: ForwardStep, channel: StageChannel) -> None:
    """Evaluation: every micro-batch through the stages, no gradients."""
    for i in range(num_micro_batches):
        y, _ = forward_step(i, channel.recv_forward())
        channel.send_forward(y)
