"""Parameter and FLOP accounting from the config alone (no model is built).

Training FLOPs per token follow the PaLM convention used for MFU: 6 x active matmul parameters
(forward + backward) + 12 x layers x attention width x sequence length for the attention scores.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import ModelConfig, MoEConfig


@dataclass
class ParamBudget:
    total_params: int
    active_params: int  # parameters touched by one token: all non-expert ones + its k experts per MoE layer
    embedding_params: int  # input embedding (+ output layer when untied)
    expert_params: int  # routed experts of all pools
    vanilla_expert_params: int  # what per-layer MoE with moe.num_experts per layer would hold
    expert_budget_percent: float  # expert_params as % of the vanilla budget
    num_pools: int
    experts_per_pool: int
    train_flops_per_token: float

    def as_dict(self) -> dict:
        return asdict(self)


def _swiglu(hidden: int, width: int) -> int:
    return 3 * hidden * width


def param_budget(model: ModelConfig, moe: MoEConfig) -> ParamBudget:
    d, layers = model.hidden_size, model.num_layers
    attention = d * model.num_heads * model.head_dim * 2 + d * model.num_kv_heads * model.head_dim * 2
    norms = 2 * d * layers + d
    embeddings = model.vocab_size * d * (1 if model.tie_embeddings else 2)
    moe_layers = moe.moe_layers(layers)
    dense_layers = layers - len(moe_layers)
    dense_ffn = _swiglu(d, model.ffn_hidden_size)
    pools = moe.pool_layout(layers)
    experts = moe.experts_per_pool(layers) if pools else 0
    expert = _swiglu(d, moe.expert_width(model.ffn_hidden_size)) if pools else 0
    router = experts * d + (1 if moe.router == "norm" else 0)
    shared = _swiglu(d, moe.shared_expert_ffn_hidden_size)
    expert_params = len(pools) * experts * expert
    per_moe_layer = router + shared
    non_expert = embeddings + norms + layers * attention + dense_layers * dense_ffn + len(moe_layers) * per_moe_layer
    active_experts = len(moe_layers) * moe.top_k * expert
    matmul_active = layers * attention + dense_layers * dense_ffn + len(moe_layers) * (router - (moe.router == "norm") + shared) + active_experts + model.vocab_size * d
    vanilla = len(moe_layers) * moe.num_experts * expert
    return ParamBudget(
        total_params=non_expert + expert_params,
        active_params=non_expert + active_experts,
        embedding_params=embeddings,
        expert_params=expert_params,
        vanilla_expert_params=vanilla,
        expert_budget_percent=100.0 * expert_params / vanilla if vanilla else 0.0,
        num_pools=len(pools),
        experts_per_pool=experts,
        train_flops_per_token=6.0 * matmul_active + 12.0 * layers * model.num_heads * model.head_dim * model.seq_len,
    )
