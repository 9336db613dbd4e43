"""The decoder-only language model: dense LLaMA, vanilla MoE or UniPool, by config.

The model owns the expert pools (one per group of MoE layers: one per layer for vanilla, one
for all of them for UniPool) and their routing statistics; each MoE layer holds only its
router and a reference to its pool.
"""
from __future__ import annotations

import collections
import contextlib
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig, MoEConfig
from ..kernels import rms_norm
from ..moe import ExpertPool, MoELayer, PoolStats, SwiGLU
from ..moe.balance import Reduce
from ..moe.lock import PoolLock
from .attention import Attention
from .documents import document_attention_mask, document_index
from .rope import RotaryEmbedding


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameter, same state dict) computed by the configured kernel."""

    def __init__(self, config: ModelConfig):
        super().__init__(config.hidden_size, eps=config.norm_eps)
        self.backend = config.rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.backend)


# A block's parts that model.compile hands to torch.compile. They take the block as an argument rather
# than being its methods, so that one compiled graph serves every block, and copies of the model, alike.
def _attention_sublayer(block: "Block", x: torch.Tensor, mask_B1SS: Optional[torch.Tensor]) -> torch.Tensor:
    return x + block.attention(block.attention_norm(x), mask_B1SS)


def _ffn_input(block: "Block", x: torch.Tensor) -> torch.Tensor:
    return block.ffn_norm(x)


def _dense_ffn(block: "Block", x: torch.Tensor) -> torch.Tensor:
    return block.ffn(block.ffn_norm(x))


class Block(nn.Module):
    """Pre-norm transformer block. model.activation_checkpointing 'block' recomputes all of it in
    backward; 'ffn' a dense FFN with its norm (here) or an MoE layer's expert half (the layer itself:
    its norm and routing run once); 'attention' the attention core (the attention itself).

    model.compile: its attention sublayer (norm, attention, residual add), the MoE layer's input norm and
    a dense FFN with its norm run as torch.compile graphs, which fuse their elementwise work (norms, RoPE,
    SwiGLU's activation, casts, the residual add) into a few kernels; so does the MoE router from its logits
    to the gates (moe.router). The MoE layer's dispatch and experts, whose row counts change every
    micro-batch, stay eager.
    """

    def __init__(self, config: ModelConfig, rope: RotaryEmbedding, ffn: nn.Module, output_std: float):
        super().__init__()
        self.config = config
        self.attention_norm = RMSNorm(config)
        self.attention = Attention(config, rope, output_std)
        self.ffn_norm = RMSNorm(config)
        self.ffn = ffn
        parts = (_attention_sublayer, _ffn_input, _dense_ffn)
        self._attention_sublayer, self._ffn_input, self._dense_ffn = (
            tuple(torch.compile(part) for part in parts) if config.compile else parts)

    def forward(self, x: torch.Tensor, mask_B1SS: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`mask_B1SS`: packed documents' attention mask (Attention.forward), or None."""
        if self.config.activation_checkpointing == "block" and torch.is_grad_enabled():
            # the recomputation re-routes the same tokens; it must not count them in the pool statistics again
            pause = self.ffn.stats.paused if isinstance(self.ffn, MoELayer) else contextlib.nullcontext
            return checkpoint(self._forward, x, mask_B1SS, use_reentrant=False,
                              context_fn=lambda: (contextlib.nullcontext(), pause()))
        return self._forward(x, mask_B1SS)

    def _forward(self, x: torch.Tensor, mask_B1SS: Optional[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self._attention_sublayer(self, x, mask_B1SS)
        if isinstance(self.ffn, MoELayer):
            out, losses = self.ffn(self._ffn_input(self, x))
            return x + out, losses
        if self.config.activation_checkpointing == "ffn" and torch.is_grad_enabled():
            return x + checkpoint(self._dense_ffn, self, x, use_reentrant=False), {}
        return x + self._dense_ffn(self, x), {}


@dataclass
class RoutingStepStats:
    """One optimizer step's routing, summed over ranks: tokens per (MoE layer, expert) of each pool."""

    counts_per_pool: list[torch.Tensor] = field(default_factory=list)  # [layers in pool, experts]
    slots_per_pool: list[torch.Tensor] = field(default_factory=list)  # [layers in pool]: tokens x k
    # totals over every pool and layer: slots that reached an expert (dropped ones included), all slots, dropped
    routed: int = 0
    slots: int = 0
    dropped: int = 0

    def unrouted_fraction(self) -> Optional[float]:
        """Share of the routing slots that reached no expert (NormRouter: fewer than k positive scores)."""
        return 1 - self.routed / self.slots if self.slots else None

    def unrouted_per_layer(self, pool_layout: list[list[int]]) -> dict[int, float]:
        """The same share for each MoE layer, by its index (`pool_layout`: each pool's layers)."""
        shares = {}
        for layers, counts_LM, slots_L in zip(pool_layout, self.counts_per_pool, self.slots_per_pool):
            routed, slots = torch.stack([counts_LM.sum(1), slots_L]).tolist()  # one read per pool
            shares.update({layer: 1 - r / max(s, 1) for layer, r, s in zip(layers, routed, slots)})
        return shares


class LanguageModel(nn.Module):
    def __init__(self, model: ModelConfig, moe: MoEConfig):
        super().__init__()
        self.config, self.moe_config = model, moe
        output_std = model.init_std / math.sqrt(2 * model.num_layers)
        self.embedding = nn.Embedding(model.vocab_size, model.hidden_size)
        nn.init.normal_(self.embedding.weight, 0.0, model.init_std)
        self.rope = RotaryEmbedding(model.head_dim, model.seq_len, model.rope_base, model.rope_kernel)
        self.expert_pools = nn.ModuleList()
        self.pool_stats = nn.ModuleList()
        self.pool_locks = nn.ModuleList()  # UniPool-lock state, one per pool when moe.lock_start_step is set
        ffns: dict[int, nn.Module] = {}
        for layers in moe.pool_layout(model.num_layers):
            experts = moe.experts_per_pool(model.num_layers)
            pool = ExpertPool(experts, model.hidden_size, moe.expert_width(model.ffn_hidden_size), model.init_std, output_std,
                              model.expert_gemm, model.swiglu_kernel, model.pool_wgrad_kernel)
            stats = PoolStats(len(layers), experts, moe.pool_aux_lag)
            self.expert_pools.append(pool)
            self.pool_stats.append(stats)
            lock = PoolLock(moe, len(layers), experts) if moe.lock_start_step is not None else None
            if lock is not None:
                self.pool_locks.append(lock)
            for slot, layer in enumerate(layers):
                ffns[layer] = MoELayer(moe, model.hidden_size, pool, stats, slot, len(layers), model.init_std, output_std,
                                       recompute_experts=model.activation_checkpointing == "ffn", lock=lock,
                                       permute_kernel=model.permute_kernel, compile_router=model.compile)
        self.layers = nn.ModuleList(
            Block(model, self.rope, ffns.get(i) or SwiGLU(model.hidden_size, model.ffn_hidden_size, model.init_std, output_std,
                                                          model.swiglu_kernel), output_std)
            for i in range(model.num_layers)
        )
        self.local_layers = list(range(model.num_layers))  # this pipeline stage's layers
        self.final_norm = RMSNorm(model)
        self.output = nn.Linear(model.hidden_size, model.vocab_size, bias=False)
        if model.tie_embeddings:
            self.output.weight = self.embedding.weight
        else:
            nn.init.normal_(self.output.weight, 0.0, model.init_std)

    def forward(self, inputs: torch.Tensor, documents_BS: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits [B, S, V] and the MoE losses summed over layers (aux_loss, z_loss, entropy_loss: those
        configured).

        `inputs` are tokens [B, S]; a pipeline stage without the embedding takes the previous
        stage's hidden states [B, S, D] and, without the output layer, returns its own. `documents_BS`
        (documents_of the tokens) keeps attention within each packed document.
        """
        x = self.embedding(inputs) if self.embedding is not None else inputs
        mask_B1SS = None
        if documents_BS is not None:  # in the dtype q and k take: autocast's, else the hidden states'
            device = x.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
            mask_B1SS = document_attention_mask(documents_BS, dtype)
        losses: dict[str, torch.Tensor] = {}
        with contextlib.ExitStack() as deferring:
            for pool in self._pools_deferring_weight_gradients():
                x = deferring.enter_context(pool.deferred_weight_gradients(x))
            for i in self.local_layers:
                x, layer_losses = self.layers[i](x, mask_B1SS)
                for name, value in layer_losses.items():
                    losses[name] = losses[name] + value if name in losses else value
        if self.output is None:
            return x, losses
        return self.output(self.final_norm(x)), losses

    def documents_of(self, tokens_BS: torch.Tensor, eod_id: Optional[int]) -> Optional[torch.Tensor]:
        """What forward's `documents_BS` takes for these input tokens: each token's document under
        model.document_masking (`eod_id`: the data's end-of-document id), else None (one causal sequence)."""
        if not self.config.document_masking or eod_id is None:
            return None
        return document_index(tokens_BS, eod_id)

    def _pools_deferring_weight_gradients(self) -> list[ExpertPool]:
        """Pools that several of this stage's layers call, when this forward will be backpropagated."""
        if self.config.pool_weight_gradients != "deferred" or not torch.is_grad_enabled():
            return []
        calls = collections.Counter(layer.pool for layer in self.moe_layers())
        return [pool for pool, layers in calls.items() if layers > 1 and pool.w_gate.requires_grad]

    def moe_layers(self) -> list[MoELayer]:
        blocks = (self.layers[i] for i in self.local_layers)
        return [block.ffn for block in blocks if isinstance(block.ffn, MoELayer)]

    def end_micro_batch(self, reduce: Optional[Reduce] = None) -> None:
        for stats in self.pool_stats:
            stats.end_micro_batch(reduce)

    def end_optimizer_step(self, reduce: Optional[Reduce] = None, applied: bool = True) -> RoutingStepStats:
        """Close the step's routing statistics: f_bar for the next step, aux-free bias updates.

        A step whose update was skipped (`applied` False: a non-finite loss or gradient) changes
        neither; its counts are still returned for the logs.
        """
        steps = [stats.end_step(reduce, update_f_bar=applied) for stats in self.pool_stats]
        result = RoutingStepStats([step.counts for step in steps], [step.slots for step in steps])
        if steps:  # one read for every pool
            result.routed, result.slots, result.dropped = torch.stack([
                sum(step.counts.sum() for step in steps), sum(step.slots.sum() for step in steps),
                sum(step.dropped for step in steps)]).tolist()
        counts_of = {stats: step.counts for stats, step in zip(self.pool_stats, steps)}
        if self.moe_config.bias_balancing and applied:
            for layer in self.moe_layers():
                usable = layer.lock.usable(layer.layer_slot) if layer.lock is not None else None
                layer.router.update_bias(counts_of[layer.stats][layer.layer_slot], usable)
        return result

    def end_lock_step(self, step: int, routing: RoutingStepStats) -> None:
        """UniPool-lock bookkeeping after optimizer step `step`, with that step's routing counts."""
        for lock, counts in zip(self.pool_locks, routing.counts_per_pool):
            lock.end_step(step, counts)
