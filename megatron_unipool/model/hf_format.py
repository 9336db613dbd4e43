"""Hugging Face checkpoint formats: our config + state dict <-> a config.json dict + tensors by HF name.

An export picks the Hugging Face class that computes exactly our model's function and refuses,
with a ValueError naming every reason, when none does (docs/interop.md has the full mapping):

- dense -> LlamaForCausalLM;
- MoE with softmax routing and renormalised top-k gates (`moe.softmax_before_topk=false`, or
  `moe.normalize_gates=true`), every layer MoE -> MixtralForCausalLM, whose router is softmax over
  all experts, top-k, top-k weights renormalised to sum 1;
- other softmax-routed MoE (raw top-k probabilities as gates, or dense layers between the MoE ones)
  -> Qwen2MoeForCausalLM, with `norm_topk_prob` and `decoder_sparse_step` set to match, its
  shared expert zero-wide and its q/k/v biases zero (older implementations always build them).

Hugging Face layers own their experts, so a UniPool layer gets a copy of the pool experts it can
route to (all of them; its own ones after a hard UniPool-lock) with its router as the gate: the
logits are the same, the file holds one copy of the pool per layer.

Imports read LlamaForCausalLM only (a dense model; tools/upcycle.py turns it into MoE).

Our RoPE already uses Hugging Face's rotate-half convention and our projections are not fused,
so weights map one to one without permutation. Nothing here reads files or imports transformers.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import ModelConfig, MoEConfig

LLAMA, MIXTRAL, QWEN2_MOE = "LlamaForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM"
MODEL_TYPES = {LLAMA: "llama", MIXTRAL: "mixtral", QWEN2_MOE: "qwen2_moe"}

# per block: our name under layers.{i}. -> Hugging Face name under model.layers.{i}.
BLOCK_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
DENSE_FFN_NAMES = {"ffn.w_gate.weight": "mlp.gate_proj.weight", "ffn.w_up.weight": "mlp.up_proj.weight",
                   "ffn.w_down.weight": "mlp.down_proj.weight"}
# expert weight of our pools -> the expert's projection, per architecture
EXPERT_NAMES = {MIXTRAL: {"w_gate": "w1", "w_down": "w2", "w_up": "w3"},
                QWEN2_MOE: {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}}
MOE_BLOCK = {MIXTRAL: "block_sparse_moe", QWEN2_MOE: "mlp"}
TIED_OUTPUT = ("output.weight", "lm_head.weight")
IGNORED_ON_IMPORT = ("rotary_emb.inv_freq",)  # a buffer older transformers versions saved


def shared_names(model: ModelConfig, moe_layers=()) -> dict[str, str]:
    """Our state-dict name -> Hugging Face name for every tensor named alike in LLaMA, Mixtral and
    Qwen2-MoE: all but the MoE FFNs of `moe_layers`."""
    names = {"embedding.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight"}
    if not model.tie_embeddings:
        names[TIED_OUTPUT[0]] = TIED_OUTPUT[1]
    for i in range(model.num_layers):
        block = BLOCK_NAMES if i in moe_layers else {**BLOCK_NAMES, **DENSE_FFN_NAMES}
        for ours, theirs in block.items():
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


# ---------------------------------------------------------------------------------------- export


def hf_architecture(moe: MoEConfig) -> str:
    """The Hugging Face class computing this config's function; ValueError naming why none does."""
    if moe.kind == "dense":
        return LLAMA
    reasons = []
    if moe.router == "norm":
        reasons.append("moe.router='norm': NormRouter gates are scale * c * relu(l / ||l||) of the L2-normalised"
                       " router logits l, not a softmax over them, and tokens may get fewer than top_k experts;"
                       " no Hugging Face MoE class computes them")
    elif moe.router == "sigmoid":
        reasons.append("moe.router='sigmoid': sigmoid gates are not a softmax over the router logits, which is"
                       " what Mixtral and Qwen2-MoE route by")
    if moe.shared_expert_ffn_hidden_size:
        reasons.append(f"moe.shared_expert_ffn_hidden_size={moe.shared_expert_ffn_hidden_size}: our shared expert is"
                       " added ungated; Mixtral has none and Qwen2-MoE multiplies its one by a sigmoid gate")
    if moe.capacity_factor is not None:
        reasons.append(f"moe.capacity_factor={moe.capacity_factor}: capacity drops tokens depending on the rest of"
                       " the batch; Hugging Face MoE classes are dropless")
    if reasons:
        raise ValueError(f"this {moe.kind} model cannot be exported to Hugging Face:\n  " + "\n  ".join(reasons))
    return MIXTRAL if renormalised_gates(moe) and moe.moe_layer_interval == 1 else QWEN2_MOE


def renormalised_gates(moe: MoEConfig) -> bool:
    """Softmax routing whose k gates sum to 1: a softmax over the top-k logits (softmax after top-k)
    equals the top-k probabilities renormalised, which is what Mixtral computes."""
    return not moe.softmax_before_topk or moe.normalize_gates


def routable_experts(model: ModelConfig, moe: MoEConfig,
                     state: dict[str, torch.Tensor]) -> dict[int, tuple[int, torch.Tensor]]:
    """MoE layer -> (its pool, the pool experts it can route to); ValueError when selection depends on
    state a Hugging Face router lacks (a per-expert bias or logit offset)."""
    result, problems = {}, []
    for p, layers in enumerate(moe.pool_layout(model.num_layers)):
        offsets = state.get(f"pool_locks.{p}.offset")  # [layers in pool, experts]; present with moe.lock_start_step
        for slot, layer in enumerate(layers):
            experts = torch.arange(state[f"expert_pools.{p}.w_gate"].shape[0])
            if offsets is not None:
                penalised = (offsets[slot] != 0) & offsets[slot].isfinite()
                if penalised.any():
                    problems.append(f"layer {layer}: UniPool-lock is annealing (finite logit penalties on"
                                    f" {int(penalised.sum())} experts); export before the lock or after it is hard")
                experts = (offsets[slot] == 0).nonzero().flatten()
            bias = state[f"layers.{layer}.ffn.router.expert_bias"][experts]
            if moe.bias_balancing and bias.numel() and bias.max() != bias.min():
                problems.append(f"layer {layer}: moe.bias_balancing's expert_bias differs between experts"
                                f" (range {bias.min().item():.3g}..{bias.max().item():.3g}), so it changes which experts"
                                " are selected; Hugging Face routers select by probability alone")
            result[layer] = (p, experts)
    counts = sorted({len(experts) for _, experts in result.values()})
    if len(counts) > 1:
        problems.append(f"after the UniPool-lock the layers route to {counts} experts; Hugging Face MoE classes need"
                        " the same number in every layer")
    if problems:
        raise ValueError("this model's routing cannot be exported to Hugging Face:\n  " + "\n  ".join(problems))
    return result


def hf_config(model: ModelConfig, moe: MoEConfig, architecture: str, experts_per_layer: Optional[int],
              dtype: torch.dtype) -> dict:
    """config.json of `architecture`. Both rope spellings: `rope_theta` for transformers 4,
    `rope_parameters` for 5. No token ids: the tokenizer is not part of the export."""
    config = {
        "architectures": [architecture], "model_type": MODEL_TYPES[architecture],
        "vocab_size": model.vocab_size, "hidden_size": model.hidden_size, "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_heads, "num_key_value_heads": model.num_kv_heads, "head_dim": model.head_dim,
        "intermediate_size": model.ffn_hidden_size, "hidden_act": "silu", "max_position_embeddings": model.seq_len,
        "rms_norm_eps": model.norm_eps, "rope_theta": model.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_base},
        "tie_word_embeddings": model.tie_embeddings, "initializer_range": model.init_std, "attention_dropout": 0.0,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if architecture == LLAMA:
        config.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif architecture == MIXTRAL:
        config.update(intermediate_size=moe.expert_width(model.ffn_hidden_size), num_local_experts=experts_per_layer,
                      num_experts_per_tok=moe.top_k, router_jitter_noise=0.0, sliding_window=None,
                      output_router_logits=False, router_aux_loss_coef=moe.aux_loss_coeff)
    else:
        config.update(moe_intermediate_size=moe.expert_width(model.ffn_hidden_size), num_experts=experts_per_layer,
                      num_experts_per_tok=moe.top_k, norm_topk_prob=renormalised_gates(moe),
                      decoder_sparse_step=moe.moe_layer_interval, mlp_only_layers=[], shared_expert_intermediate_size=0,
                      qkv_bias=True, use_sliding_window=False, sliding_window=None, max_window_layers=model.num_layers,
                      output_router_logits=False, router_aux_loss_coef=moe.aux_loss_coeff)
    return config


def to_hf(model: ModelConfig, moe: MoEConfig, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, tensors by Hugging Face name) computing the same logits as our model.

    The tensors are fresh contiguous copies sharing no memory (safetensors refuses shared ones).
    """
    architecture = hf_architecture(moe)
    moe_layers = routable_experts(model, moe, state) if moe.kind != "dense" else {}
    tensors = {theirs: state[ours] for ours, theirs in shared_names(model, moe_layers).items()}
    for layer, (pool, experts) in moe_layers.items():
        prefix = f"model.layers.{layer}.{MOE_BLOCK[architecture]}"
        tensors[f"{prefix}.gate.weight"] = state[f"layers.{layer}.ffn.router.weight"][experts]
        for ours, theirs in EXPERT_NAMES[architecture].items():
            pool_weights = state[f"expert_pools.{pool}.{ours}"]
            for j, expert in enumerate(experts.tolist()):  # views: the one copy is the clone below
                tensors[f"{prefix}.experts.{j}.{theirs}.weight"] = pool_weights[expert]
    if architecture == QWEN2_MOE:
        tensors.update(_qwen2_moe_zeros(model, moe_layers, state["embedding.weight"]))
    experts_per_layer = len(next(iter(moe_layers.values()))[1]) if moe_layers else None
    config = hf_config(model, moe, architecture, experts_per_layer, state["embedding.weight"].dtype)
    return config, {name: t.detach().clone(memory_format=torch.contiguous_format) for name, t in tensors.items()}


def _qwen2_moe_zeros(model: ModelConfig, moe_layers, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """Qwen2-MoE parts our model lacks, made to contribute exactly nothing: zero q/k/v biases and, in
    each MoE layer, a zero-wide shared expert (output 0) with a zero gate."""
    d, q_rows, kv_rows = model.hidden_size, model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    zeros = {}
    for i in range(model.num_layers):
        for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            zeros[f"model.layers.{i}.self_attn.{proj}.bias"] = like.new_zeros(rows)
    for layer in moe_layers:
        prefix = f"model.layers.{layer}.{MOE_BLOCK[QWEN2_MOE]}"
        zeros.update({f"{prefix}.shared_expert.gate_proj.weight": like.new_zeros(0, d),
                      f"{prefix}.shared_expert.up_proj.weight": like.new_zeros(0, d),
                      f"{prefix}.shared_expert.down_proj.weight": like.new_zeros(d, 0),
                      f"{prefix}.shared_expert_gate.weight": like.new_zeros(1, d)})
    return zeros


# ---------------------------------------------------------------------------------------- import


LLAMA_REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")
LLAMA_DEFAULT_MAX_POSITIONS = 2048  # transformers' LlamaConfig default, for a config.json without the key


def llama_model_config(config: dict) -> ModelConfig:
    """Our dense model config of a LlamaForCausalLM config.json; ValueError naming every required key that is
    missing or not a positive integer, or everything our model cannot represent. Needs no tensors, so a
    tool checks config.json with it before reading any shard."""
    if not isinstance(config, dict):
        raise ValueError(f"config.json must hold a JSON object, not {type(config).__name__}")
    architectures = config.get("architectures") or []
    if config.get("model_type") != "llama" or architectures not in ([], [LLAMA]):
        raise ValueError(f"only LlamaForCausalLM checkpoints can be imported, not model_type="
                         f"{config.get('model_type')!r} architectures={architectures}")
    bad = [f"{key} missing" if key not in config else f"{key}={config[key]!r} is not a positive integer"
           for key in LLAMA_REQUIRED
           if not (isinstance(config.get(key), int) and not isinstance(config[key], bool) and config[key] > 0)]
    if bad:
        raise ValueError("this LlamaForCausalLM config lacks required sizes:\n  " + "\n  ".join(bad))
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}  # transformers' order: the legacy key wins
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    head_dim = config.get("head_dim") or hidden // heads
    refusals = [
        (config.get("attention_bias", False), "attention_bias=true: our attention projections have no bias"),
        (config.get("mlp_bias", False), "mlp_bias=true: our SwiGLU projections have no bias"),
        (config.get("hidden_act", "silu") not in ("silu", "swish"),  # transformers' two names of one function
         f"hidden_act={config.get('hidden_act')!r}: our FFN is SwiGLU (silu)"),
        (rope_type != "default", f"rope type {rope_type!r}: our RoPE has no scaling (only 'default')"),
        (head_dim * heads != hidden, f"head_dim={head_dim} x num_attention_heads={heads} != hidden_size={hidden}:"
                                     " our head dim is hidden_size / num_heads"),
    ]
    reasons = [reason for refused, reason in refusals if refused]
    if reasons:
        raise ValueError("this LlamaForCausalLM cannot be imported:\n  " + "\n  ".join(reasons))
    return ModelConfig(
        num_layers=config["num_hidden_layers"], hidden_size=hidden, num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads, ffn_hidden_size=config["intermediate_size"],
        vocab_size=config["vocab_size"], seq_len=config.get("max_position_embeddings", LLAMA_DEFAULT_MAX_POSITIONS),
        rope_base=float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0),  # a null is a missing key
        norm_eps=config.get("rms_norm_eps", 1e-6), init_std=config.get("initializer_range", ModelConfig.init_std),
        tie_embeddings=config.get("tie_word_embeddings", False))


def from_hf_llama(config: dict, tensors: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Our dense model config and state dict (fp32, our training precision) of a LlamaForCausalLM;
    ValueError naming everything our model cannot represent."""
    model = llama_model_config(config)
    names = shared_names(model)
    known = set(names.values()) | {TIED_OUTPUT[1]}
    problems = [f"missing {theirs}" for theirs in names.values() if theirs not in tensors]
    problems += [f"unexpected {name}" for name in sorted(tensors)
                 if name not in known and not name.endswith(IGNORED_ON_IMPORT)]
    tied_output, embedding = tensors.get(TIED_OUTPUT[1]), tensors.get(names["embedding.weight"])
    if model.tie_embeddings and tied_output is not None and embedding is not None and not torch.equal(tied_output,
                                                                                                     embedding):
        # transformers then loads the two untied, and our tied model would compute other logits
        problems.append(f"{TIED_OUTPUT[1]} differs from {names['embedding.weight']} although tie_word_embeddings=true;"
                        " set tie_word_embeddings=false in config.json to import them as two tensors")
    if problems:
        raise ValueError("the tensors do not fit a LlamaForCausalLM of this config:\n  " + "\n  ".join(problems))
    state = {ours: tensors[theirs].float() for ours, theirs in names.items()}
    if model.tie_embeddings:
        state[TIED_OUTPUT[0]] = state["embedding.weight"]
    return model, state
