"""Cut the full model down to this rank's part of a (tp, pp, ep) layout.

Every rank builds the same full model from the seed and keeps its share, so a model starts
from the same values under every layout and a single-process run is the reference of all of
them. What stays keeps its full-model name (layers of other stages become parameter-free
placeholders), and `ShardSpec` says which slice of the full tensor each name holds: that is
all a checkpoint needs to be reassembled and loaded at another layout.

- pipeline: stage s keeps layers [s*L/pp, (s+1)*L/pp); the first stage the embedding, the last
  the final norm and output layer. A pool stays on every stage whose layers use it (UniPool:
  all), with the same expert shard everywhere.
- tensor: q/k/v and the SwiGLU gate/up (dense FFNs, shared experts) are column-parallel,
  their output projections row-parallel, the embedding and output layer vocabulary-parallel.
  Routers, norms and experts are replicated over tp.
- expert: each pool keeps experts [ep_rank*M/ep, (ep_rank+1)*M/ep).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn

from ..config import stage_layers
from ..moe import ExpertPool, MoELayer, SwiGLU
from ..parallel.state import Layout, ParallelState
from ..parallel.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, TensorParallelInput,
                                        VocabParallelEmbedding)
from .transformer import LanguageModel


@dataclass(frozen=True)
class ShardSpec:
    """Which slice of the full tensor a rank holds: chunk `index` of `parts` along `dim`."""

    dim: Optional[int] = None  # None: the whole tensor (replicated)
    index: int = 0
    parts: int = 1
    pool_stages: Optional[tuple[int, ...]] = None  # expert pool tensors: the stages sharing them

    def holds_canonical_copy(self, layout: Layout) -> bool:
        """One rank per distinct slice answers for it (in checkpoints and the gradient norm)."""
        if self.pool_stages is not None:
            return layout.edp_rank == 0 and layout.tp_rank == 0 and layout.pp_rank == self.pool_stages[0]
        return layout.dp_rank == 0 and (self.dim is not None or layout.tp_rank == 0)

    def take(self, full):
        return full if self.dim is None else full.chunk(self.parts, dim=self.dim)[self.index]


REPLICATED = ShardSpec()


def shard_model(model: LanguageModel, state: ParallelState) -> dict[str, ShardSpec]:
    """Shard `model` in place for this rank; returns the spec of every tensor that is not replicated."""
    L = state.layout
    specs: dict[str, ShardSpec] = {}
    keep = stage_layers(model.config.num_layers, L.pp, L.pp_rank)
    for i in range(model.config.num_layers):
        if i not in keep:
            model.layers[i] = nn.Identity()
    model.local_layers = list(keep)
    if L.pp_rank > 0:
        model.embedding = None
    if L.pp_rank < L.pp - 1:
        model.final_norm = model.output = None

    used = {id(layer.pool) for layer in model.moe_layers()}
    for p, (pool, stages) in enumerate(zip(list(model.expert_pools), model.moe_config.pool_stages(model.config.num_layers, L.pp))):
        if id(pool) not in used:
            model.expert_pools[p] = nn.Identity()
            continue
        if L.ep > 1:
            pool.shard_(L.ep_rank, L.ep, state.ep_group)
        for name in ExpertPool.WEIGHTS:
            specs[f"expert_pools.{p}.{name}"] = ShardSpec(0, L.ep_rank, L.ep, stages)

    if L.tp > 1:
        tp = (state.tp_group, L.tp_rank, L.tp)
        for i in keep:
            block = model.layers[i]
            attention = block.attention
            attention.projection_input = TensorParallelInput(state.tp_group)
            attention.wq, attention.wk, attention.wv = (ColumnParallelLinear(linear, *tp, shared_input=True)
                                                        for linear in (attention.wq, attention.wk, attention.wv))
            attention.wo = RowParallelLinear(attention.wo, *tp)
            ffn = block.ffn.shared_expert if isinstance(block.ffn, MoELayer) else block.ffn
            if isinstance(ffn, SwiGLU):
                ffn.projection_input = TensorParallelInput(state.tp_group)
                ffn.w_gate, ffn.w_up = (ColumnParallelLinear(linear, *tp, shared_input=True)
                                        for linear in (ffn.w_gate, ffn.w_up))
                ffn.w_down = RowParallelLinear(ffn.w_down, *tp)
        if model.embedding is not None:
            model.embedding = VocabParallelEmbedding(model.embedding, *tp)
        if model.output is not None:
            model.output = ColumnParallelLinear(model.output, *tp)
            if model.config.tie_embeddings:  # same vocabulary range on the same rank
                model.output.weight = model.embedding.weight
        for name, module in model.named_modules():
            if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
                specs[f"{name}.weight"] = ShardSpec(0, L.tp_rank, L.tp)
            elif isinstance(module, RowParallelLinear):
                specs[f"{name}.weight"] = ShardSpec(1, L.tp_rank, L.tp)
    return specs
