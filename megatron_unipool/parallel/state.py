"""Every process group of a run, built once from (tp, pp, ep, world size) and held here.

Rank layout (Megatron's, and DeepSpeed's pipe/data/model topology): tensor-parallel ranks are
neighbours, then data-parallel, then pipeline stages:

    rank = tp_rank + tp * (dp_rank + dp * pp_rank),     dp = world / (tp * pp)

Experts are sharded over data-parallel replicas: within one (pp stage, tp rank), the dp ranks
form dp/ep expert-parallel groups of ep neighbours; `ep_rank = dp_rank % ep` says which shard
of every pool a rank holds, in every stage alike, so every stage routes into the same ep ranks.
A shard's replicas (the expert-data-parallel group) are the dp ranks with the same ep_rank.

Groups are created by every rank in the same order (torch.distributed requires it); a
single-process run has no groups of ours and every collective below is skipped (DeepSpeed's engine,
when enabled, gets one group of the rank alone: parallel/deepspeed_mpu.py).
"""
from __future__ import annotations

import datetime
import itertools
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from ..config import ParallelConfig

Group = Optional[dist.ProcessGroup]


@dataclass(frozen=True)
class Layout:
    """Parallel degrees and this rank's coordinates."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    rank: int = 0

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, dp_rank, pp_rank) of `rank`."""
        return rank % self.tp, (rank // self.tp) % self.dp, rank // (self.tp * self.dp)

    def rank_of(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)

    @property
    def tp_rank(self) -> int:
        return self.coordinates(self.rank)[0]

    @property
    def dp_rank(self) -> int:
        return self.coordinates(self.rank)[1]

    @property
    def pp_rank(self) -> int:
        return self.coordinates(self.rank)[2]

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep

    @property
    def edp_rank(self) -> int:
        """Which replica of its expert shard this rank is."""
        return self.dp_rank // self.ep

    def ranks(self, tp=None, dp=None, pp=None) -> list[int]:
        """Ranks whose coordinates lie in the given sets (None: all values)."""
        tps = range(self.tp) if tp is None else tp
        dps = range(self.dp) if dp is None else dp
        pps = range(self.pp) if pp is None else pp
        return sorted(self.rank_of(t, d, p) for t, d, p in itertools.product(tps, dps, pps))


@dataclass
class ParallelState:
    """The layout and its process groups (None where the group would have one rank)."""

    layout: Layout = field(default_factory=Layout)
    tp_group: Group = None
    dp_group: Group = None  # replicas of this rank's dense weights
    ep_group: Group = None  # ranks holding the shards of one copy of each pool
    routing_group: Group = None  # every rank with this rank's tp rank, over dp and pp: each routes its own tokens
    # every rank, over gloo: Python objects (checkpoint pieces, shared decisions) travel through host
    # memory, not through a GPU buffer of world size x the largest object as NCCL's object collectives
    host_group: Group = None
    timeout: Optional[datetime.timedelta] = None  # of every group, parallel.timeout_s
    _pool_groups: dict = field(default_factory=dict)  # frozenset of stages -> replicas of this rank's shard

    @property
    def distributed(self) -> bool:
        return self.layout.world_size > 1

    @property
    def pool_stage_sets(self) -> list[tuple[int, ...]]:
        """Each distinct set of pipeline stages that share a pool, in order."""
        return sorted(tuple(sorted(stages)) for stages in self._pool_groups)

    def pool_group(self, stages: Iterable[int]) -> Group:
        """Every replica of this rank's pool shard in a pool used by `stages`: over the expert-data-parallel
        ranks of each of those stages. Gradients of the pool are summed over it."""
        return self._pool_groups.get(frozenset(stages))


def group_ranks(layout: Layout, pool_stage_sets: Iterable[Iterable[int]] = ()) -> dict:
    """Every group of the layout as rank lists: {kind: [ranks, ...]}, pool groups under ("pool", stages)."""
    L = layout
    blocks = [range(b * L.ep, (b + 1) * L.ep) for b in range(L.dp // L.ep)]
    replicas = [range(e, L.dp, L.ep) for e in range(L.ep)]
    groups = {
        "tp": [L.ranks(dp=[d], pp=[p]) for p in range(L.pp) for d in range(L.dp)],
        "dp": [L.ranks(tp=[t], pp=[p]) for p in range(L.pp) for t in range(L.tp)],
        "ep": [L.ranks(tp=[t], dp=b, pp=[p]) for p in range(L.pp) for t in range(L.tp) for b in blocks],
        "routing": [L.ranks(tp=[t]) for t in range(L.tp)],
    }
    for stages in sorted({tuple(sorted(set(s))) for s in pool_stage_sets}):
        groups[("pool", stages)] = [L.ranks(tp=[t], dp=r, pp=stages) for t in range(L.tp) for r in replicas]
    return groups


def create_groups(rank_sets: list[list[int]], rank: int, timeout: Optional[datetime.timedelta]) -> Group:
    """Create one group per rank set (every rank creates all of them, in the same order) and return
    the one holding `rank`. Sets of one rank get no group (None). `timeout`
    applies to the group's collectives (without it a subgroup waits the backend's default: 10-30 min)."""
    found = None
    for ranks in rank_sets:
        group = dist.new_group(ranks, timeout=timeout) if len(ranks) > 1 else None
        if rank in ranks:
            found = group
    return found


def build_parallel_state(tp: int, pp: int, ep: int, pool_stage_sets: Iterable[Iterable[int]] = (),
                         timeout_s: Optional[float] = None) -> ParallelState:
    """Create all groups on an initialised default group (a no-op layout when there is none).

    `pool_stage_sets` lists, for each pool, the pipeline stages whose layers use it; a group is
    created for each distinct set so that a pool's gradients reduce over exactly its replicas.
    Collectives in every group time out after `timeout_s` (None: the backend's default).
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    errors = ParallelConfig(tp=tp, pp=pp, ep=ep).layout_errors(world)
    if errors:
        raise ValueError("; ".join(errors))
    layout = Layout(tp=tp, pp=pp, dp=world // (tp * pp), ep=ep, rank=dist.get_rank() if world > 1 else 0)
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    state = ParallelState(layout, timeout=timeout)
    if world == 1:
        return state
    mine = {kind: create_groups(rank_sets, layout.rank, timeout)
            for kind, rank_sets in group_ranks(layout, pool_stage_sets).items()}
    state.host_group = (dist.group.WORLD if dist.get_backend() == "gloo"
                        else dist.new_group(backend="gloo", timeout=timeout))
    for kind in ("tp", "dp", "ep", "routing"):
        setattr(state, f"{kind}_group", mine[kind])
    state._pool_groups = {frozenset(kind[1]): group for kind, group in mine.items() if isinstance(kind, tuple)}
    return state


class LaunchError(RuntimeError):
    """The environment does not describe a job this process can join."""


JOB_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # beside WORLD_SIZE: what the launchers set


def job_position() -> tuple[int, int, int]:
    """(WORLD_SIZE, RANK, LOCAL_RANK) from the environment the launcher set (1, 0, 0 when unset), checked."""
    values = {}
    for name, default in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        text = os.environ.get(name, default)
        try:
            values[name] = int(text)
        except ValueError:
            raise LaunchError(f"{name}={text!r} is not a whole number") from None
    world, rank, local = values.values()
    if world < 1 or not 0 <= rank < world or local < 0:
        raise LaunchError(f"WORLD_SIZE={world}, RANK={rank}, LOCAL_RANK={local}: a job needs WORLD_SIZE >= 1,"
                          " 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0")
    return world, rank, local


def init_distributed_from_env(timeout_s: float, even_alone: bool = False) -> int:
    """Join the job the launcher (deepspeed, torchrun) described in the environment; returns the world size.

    NCCL on GPUs, gloo on CPU. Collectives time out after `timeout_s`, so a dead rank ends the
    job with an error instead of a hang. A single process gets a process group of its own only
    with `even_alone` (DeepSpeed's engine needs one).
    """
    world, rank, local_rank = job_position()
    if dist.is_initialized():
        return dist.get_world_size()
    if world == 1 and not even_alone:
        return 1
    missing = [name for name in JOB_VARIABLES if name not in os.environ]
    if world > 1 and missing:  # DeepSpeed would look for MPI instead (mpi4py), and could make each rank a job of 1
        raise LaunchError(f"WORLD_SIZE={world} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set:"
                          " start the job with the deepspeed launcher or torchrun, or set " + ", ".join(JOB_VARIABLES)
                          + " for every process (LOCAL_RANK: its rank within its node)")
    if world == 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                           ("MASTER_PORT", str(port))):
            os.environ.setdefault(key, value)
    if rank > 0:
        wait_for_rendezvous(os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], timeout_s)
    timeout = datetime.timedelta(seconds=timeout_s)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    try:
        import deepspeed
    except ImportError:
        dist.init_process_group(backend, timeout=timeout)
    else:
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout, auto_mpi_discovery=False)
    return dist.get_world_size()


RENDEZVOUS_POLL_S = 0.2


def wait_for_rendezvous(address: str, port: str, timeout_s: float) -> None:
    """Until MASTER_ADDR:MASTER_PORT accepts a connection (rank 0's store, or torchrun's agent's): a
    DistNetworkError after `timeout_s`. torch's store client, left to wait for a rank 0 that never started,
    retries its whole timeout once more (about 2.2 x parallel.timeout_s: 22 minutes at the default) and prints
    its C++ stack on the way; a port that is not a number is left to torch to name."""
    if not port.isdigit():
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((address, int(port)), timeout=max(0.1, min(1.0, deadline - time.monotonic()))).close()
            return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise dist.DistNetworkError(f"nothing listened at MASTER_ADDR={address} MASTER_PORT={port} (rank 0's"
                                            f" rendezvous) within {timeout_s:g} s: {error.strerror or error}") from None
            time.sleep(RENDEZVOUS_POLL_S)


def all_reduce(tensor: torch.Tensor, group: Group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce that is a no-op without a group (single rank)."""
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor
