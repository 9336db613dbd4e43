"""What an optimizer step needs across ranks: gradient reduction, the global gradient norm, and
checkpoint state gathered into (and scattered from) full-model tensors.

Each rank's loss is its share of the global loss (its tokens over the tokens of the whole
global batch), so every reduction is a plain sum:
- dense weights over the data-parallel group;
- a pool shard over every replica of it: the expert-data-parallel ranks of every stage that
  uses the pool (the all-to-all has already summed the expert-parallel ranks' tokens into it).
  This is how the pool stays identical in every pipeline stage;
- tensor-parallel replicas (norms, routers, experts) see identical inputs and need nothing.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..config import Config, ConfigError, config_to_dict
from ..model.sharding import REPLICATED, ShardSpec
from ..parallel import ParallelState, build_parallel_state
from ..parallel.agreement import check_agreement


def _sum_over(tensors: list[torch.Tensor], group) -> None:
    """All-reduce a list of tensors as one flat buffer per dtype (one collective, not one per tensor)."""
    by_dtype = defaultdict(list)
    for t in tensors:
        by_dtype[t.dtype].append(t)
    for same in by_dtype.values():
        flat = _flatten_dense_tensors(same)
        dist.all_reduce(flat, group=group)
        for t, reduced in zip(same, _unflatten_dense_tensors(flat, same)):
            t.copy_(reduced)


def check_same_config(config: Config) -> None:
    """Raise ConfigError on every rank unless all loaded the same config. Node-local copies of a file can
    differ: replicas with another learning rate drift apart silently, other shapes hang in a collective.
    data.cache_dir is left out: made absolute where each node runs, it differs between nodes that start in
    different directories, and only the data found there matters (the trainer compares that)."""
    fields = {f"{section}.{key}": value for section, values in config_to_dict(config).items()
              for key, value in values.items() if f"{section}.{key}" != "data.cache_dir"}
    check_agreement(fields, None, ConfigError,
                    "the ranks loaded different configs (a node's copy of the file, or its --set, differs)",
                    lambda theirs, ours: ", ".join(f"{key}={theirs[key]!r} (rank 0: {ours[key]!r})"
                                                   for key in ours if theirs[key] != ours[key]))


def reduce_gradients(model: nn.Module, specs: dict[str, ShardSpec], state: ParallelState) -> None:
    """Sum every trainable parameter's gradient over its replicas. One that no token reached this step
    (a pool whose every score the NormRouter zeroed) gets a zero gradient on every layout, one process
    included: a replica elsewhere may have one, and AdamW must then move it (momentum, weight decay)
    alike everywhere, not skip it on one process only."""
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    for _, param in trainable:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    if not state.distributed:
        return
    dense, pools = [], defaultdict(list)
    for name, param in trainable:
        stages = specs.get(name, REPLICATED).pool_stages
        (dense if stages is None else pools[stages]).append(param.grad)
    if state.dp_group is not None:
        _sum_over(dense, state.dp_group)
    for stages in sorted(pools):
        group = state.pool_group(stages)
        if group is not None:
            _sum_over(pools[stages], group)


def global_grad_norm(model: nn.Module, specs: dict[str, ShardSpec], state: ParallelState) -> torch.Tensor:
    """L2 norm of the full model's gradient, each distinct slice counted once over all ranks (torch's
    multi-tensor kernels: a few launches, not a few per parameter)."""
    grads = [param.grad.detach() for name, param in model.named_parameters()
             if param.grad is not None and specs.get(name, REPLICATED).holds_canonical_copy(state.layout)]
    # a rank holding no canonical slice (a data-parallel replica) adds a zero, on the model's device: NCCL has no CPU
    total = (torch.nn.utils.get_total_norm(grads).float().square() if grads
             else torch.zeros((), device=next(model.parameters()).device))
    if state.distributed:
        dist.all_reduce(total)
    return total.sqrt()


def clip_gradients(model: nn.Module, specs: dict[str, ShardSpec], state: ParallelState, max_norm: float) -> float:
    norm = global_grad_norm(model, specs, state)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, norm)
    return norm.item()


def _assemble(pieces: list[tuple[ShardSpec, torch.Tensor]]) -> torch.Tensor:
    """Full tensor from the canonical slices of one name (a replicated one is its own full tensor)."""
    spec = pieces[0][0]
    if spec.dim is None:
        return pieces[0][1]
    by_index = {s.index: t for s, t in pieces}
    return torch.cat([by_index[i] for i in range(spec.parts)], dim=spec.dim)


def gather_full_tensors(tensors: dict[str, torch.Tensor], specs: dict[str, ShardSpec],
                        state: ParallelState) -> Optional[dict[str, torch.Tensor]]:
    """The full-model tensors of named shards (weights, gradients, optimizer moments), on rank 0 only."""
    layout = state.layout
    pieces = {name: (specs.get(name, REPLICATED), t.detach().cpu()) for name, t in tensors.items()
              if specs.get(name, REPLICATED).holds_canonical_copy(layout)}
    everyone = [pieces]
    if state.distributed:  # one rank at a time, through host memory: rank 0 holds the state and one message
        if layout.rank != 0:
            dist.send_object_list([pieces], dst=0, group=state.host_group)
            return None
        for source in range(1, layout.world_size):
            received = [None]
            dist.recv_object_list(received, src=source, group=state.host_group)
            everyone.append(received[0])
    by_name = defaultdict(list)
    for rank_pieces in everyone:
        for name, piece in rank_pieces.items():
            by_name[name].append(piece)
    return {name: _assemble(p) for name, p in by_name.items()}


OPTIMIZER_SEPARATOR = "::"
OPTIMIZER_KEY = "{name}" + OPTIMIZER_SEPARATOR + "{key}"


def gather_full_state(model: nn.Module, model_tensors: dict[str, torch.Tensor], optimizer_tensors: dict[str, torch.Tensor],
                      specs: dict[str, ShardSpec], state: ParallelState) -> Optional[tuple[dict, dict]]:
    """(model state dict, optimizer state by parameter name) of the full model, on rank 0 only.

    `optimizer_tensors` are named OPTIMIZER_KEY; a moment shaped like its parameter is sliced
    like it. Both results are layout independent, the same as a single-process run's, so a
    checkpoint loads at any layout.
    """
    tensors, all_specs = dict(model_tensors), dict(specs)
    for flat, value in optimizer_tensors.items():
        name = flat.split(OPTIMIZER_SEPARATOR)[0]
        tensors[flat] = value
        all_specs[flat] = specs.get(name, REPLICATED) if value.shape == model.get_parameter(name).shape else REPLICATED
    full = gather_full_tensors(tensors, all_specs, state)
    if full is None:
        return None
    model_state, optimizer_state = {}, defaultdict(dict)
    for flat, value in full.items():
        if OPTIMIZER_SEPARATOR in flat:
            name, key = flat.split(OPTIMIZER_SEPARATOR)
            optimizer_state[name][key] = value
        else:
            model_state[flat] = value
    return model_state, dict(optimizer_state)


def init_parallel(config: Config) -> ParallelState:
    """The process groups of `config.parallel` on the already initialised default group, once every rank
    is known to have loaded the same config."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        check_same_config(config)
    p = config.parallel
    return build_parallel_state(p.tp, p.pp, p.ep, config.moe.pool_stages(config.model.num_layers, p.pp), p.timeout_s)
