"""Decisions every rank must share, and failures every rank must hear of.

Ranks on different nodes can see different files (node-local disks, a shared file system that
shows a new file late). A rank that decided alone, or failed alone, would leave the others
training a different model or waiting in their next collective until the timeout.
"""
from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist

from .state import ParallelState

T = TypeVar("T")


def decided_by_rank0(decide: Callable[[], T], state: ParallelState) -> T:
    """`decide()` run on rank 0 only; every rank gets its result, or raises the error it raised."""
    if not state.distributed:
        return decide()
    box = [None]
    if state.layout.rank == 0:
        try:
            box = [(decide(), None)]
        except Exception as e:  # raised on every rank below, not only here
            box = [(None, e)]
    dist.broadcast_object_list(box, src=0, group=state.host_group)
    value, error = box[0]
    if error is not None:
        raise error
    return value


def on_any_rank(flag: bool, state: ParallelState) -> bool:
    """Whether `flag` holds on some rank, the same answer on every rank (through host memory: no
    device synchronisation)."""
    if not state.distributed:
        return flag
    anywhere = torch.tensor([int(flag)])
    dist.all_reduce(anywhere, op=dist.ReduceOp.MAX, group=state.host_group)
    return bool(anywhere.item())


def on_every_rank(action: Callable[[], T], state: ParallelState, errors: tuple[type[Exception], ...]) -> T:
    """`action()` on every rank; when it raised one of `errors` on some, every rank raises it (of the
    lowest failing rank's type, naming the failing ranks)."""
    try:
        result, failure = action(), None
    except errors as e:
        result, failure = None, e
    if not state.distributed:
        if failure is not None:
            raise failure
        return result
    reports = [None] * state.layout.world_size
    mine = None if failure is None else (next(i for i, e in enumerate(errors) if isinstance(failure, e)), str(failure))
    dist.all_gather_object(reports, mine, group=state.host_group)
    failed = [rank for rank, report in enumerate(reports) if report is not None]
    if not failed:
        return result
    kind, message = reports[failed[0]]
    error_type = errors[kind]
    where = f"rank {failed[0]}" if len(failed) == 1 else f"ranks {', '.join(map(str, failed))}"
    raise error_type(f"on {where} of {state.layout.world_size}: {message}") from failure


def check_agreement(value: T, state: Optional[ParallelState], error_type: type[Exception], what: str,
                    describe: Callable[[T, T], str]) -> None:
    """Raise `error_type` on every rank unless every rank's `value` equals rank 0's: what node-local copies
    of one file (a config, a dataset, a checkpoint) make differ. The message is `what`, then
    `describe(theirs, rank 0's)` for each differing rank. `state` None: the default group, for checks
    before the process groups exist."""
    if state is not None and not state.distributed:
        return
    group = None if state is None else state.host_group
    every = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, value, group=group)
    differing = [(rank, theirs) for rank, theirs in enumerate(every) if theirs != every[0]]
    if differing:
        shown = "; ".join(f"rank {rank}: {describe(theirs, every[0])}" for rank, theirs in differing[:4])
        raise error_type(f"{what}: {shown}" + (f"; and {len(differing) - 4} more ranks" if len(differing) > 4 else ""))
