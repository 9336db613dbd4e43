"""The run configuration: one dataclass per JSON section.

Every field is typed; `Literal[...]` lists the allowed values and `metadata` carries bounds, so
the loader can reject a bad value with a message naming the field and what it accepts. Derived
sizes (expert width, pool size, which layers are MoE) are properties, computed in one place.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal, Optional

MOE_LOSSES = ("aux_loss", "z_loss", "entropy_loss")  # every loss an MoE layer can add, in the trainer's order
Blend = dict[str, float]  # {prefix: weight}: preprocessed files mixed in proportion to the weights


def as_blend(prefix: str | Blend) -> Blend:
    """A prefix or a blend as a blend: one prefix is a blend of one file."""
    return dict(prefix) if isinstance(prefix, dict) else {prefix: 1.0}


def bounded(default, low=None, high=None, exclusive_low=False, exclusive_high=False):
    """A field with an allowed range, checked by the loader."""
    return field(default=default, metadata={"min": low, "max": high, "exclusive_min": exclusive_low,
                                            "exclusive_max": exclusive_high})


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """The layers pipeline stage `stage` of `pp` holds (model.num_layers divisible by pp). The one place
    that says so: the model's cut (model.sharding) and the pools' process groups (pool_stages) must agree."""
    per_stage = num_layers // pp
    return range(stage * per_stage, (stage + 1) * per_stage)


@dataclass
class ModelConfig:
    """LLaMA decoder shape: RMSNorm, RoPE, SwiGLU, grouped-query attention."""

    num_layers: int = bounded(4, 1, 10_000)  # a bound no model nears: a typo fails here, not in per-layer lists
    hidden_size: int = bounded(128, 1)
    num_heads: int = bounded(4, 1)
    num_kv_heads: int = bounded(2, 1)
    ffn_hidden_size: int = bounded(512, 1)  # SwiGLU width of a dense layer
    vocab_size: int = bounded(320, 1)  # >= the tokenizer's vocabulary; padding rows are never targets
    seq_len: int = bounded(128, 1)
    rope_base: float = bounded(10000.0, 0.0, exclusive_low=True)
    norm_eps: float = bounded(1e-5, 0.0, exclusive_low=True)
    init_std: float = bounded(0.02, 0.0, exclusive_low=True)
    tie_embeddings: bool = False
    # packed samples: attention stays within each document, so the model computes on each document as on it alone
    # (Megatron's --reset-attention-mask; with RoPE, which is relative, resetting positions adds nothing: documents.py)
    document_masking: bool = False
    # Kernels and memory: "auto" takes the fastest implementation this machine has (docs/performance.md)
    attention: Literal["auto", "sdpa", "flash"] = "auto"  # flash needs flash-attn and CUDA
    # grouped_mm: torch._grouped_mm (bf16 on CUDA); triton: Triton GEMMs for few rows per expert (needs Triton, CUDA)
    expert_gemm: Literal["auto", "grouped_mm", "loop", "triton"] = "auto"
    rms_norm: Literal["auto", "torch", "apex"] = "auto"  # apex: FusedRMSNorm, needs apex and CUDA
    rope_kernel: Literal["torch", "triton"] = "torch"  # triton: one fused pass each way (needs Triton, CUDA)
    swiglu_kernel: Literal["torch", "triton"] = "torch"  # silu(gate) * up: likewise (dense FFN, grouped_mm experts)
    permute_kernel: Literal["torch", "triton"] = "torch"  # the MoE permute and combine, both ways: likewise
    # a pool shared by several layers: its weight gradients once per backward over all of their tokens
    # ("deferred": keeps each layer's expert activations and their gradients until then) or per layer
    pool_weight_gradients: Literal["deferred", "per_layer"] = "deferred"
    # deferred, on the grouped_mm path: regroup the layers' rows for torch._grouped_mm, or one Triton GEMM
    # per weight reading them in place (needs Triton, CUDA)
    pool_wgrad_kernel: Literal["torch", "triton"] = "torch"
    # recompute in backward instead of storing: the attention core, the FFN (a dense FFN with its norm, an MoE
    # layer's permute, experts, combine and shared expert: not its norm or routing), or whole blocks
    activation_checkpointing: Literal["none", "attention", "ffn", "block"] = "none"
    # torch.compile each block's attention sublayer, MoE input norm, MoE router (logits to gates) and dense FFN
    # (MoE dispatch and experts stay eager): fused elementwise kernels, a slower first step
    compile: bool = False

    # how the model computes, not what: the same function (up to rounding) whatever they say
    KERNEL_FIELDS = ("attention", "expert_gemm", "rms_norm", "rope_kernel", "swiglu_kernel", "permute_kernel",
                     "pool_weight_gradients", "pool_wgrad_kernel", "activation_checkpointing", "compile")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def with_default_kernels(self) -> "ModelConfig":
        """This model computed with the defaults, which run on any machine: for tools reading a checkpoint
        whose run chose kernels for its own GPUs (Triton, flash-attn, apex, compilation)."""
        defaults = ModelConfig()
        return replace(self, **{name: getattr(defaults, name) for name in self.KERNEL_FIELDS})


@dataclass
class MoEConfig:
    """Which layers are MoE, how experts are shared, how tokens are routed and balanced.

    kind: dense (no experts), vanilla (each MoE layer owns `num_experts`), unipool (one pool of
    `pool_size` experts shared by every `layers_per_pool` adjacent MoE layers; all of them when
    unset, which is UniPool proper; smaller values give the grouped-pool ablation).
    """

    kind: Literal["dense", "vanilla", "unipool"] = "unipool"
    num_experts: int = bounded(8, 1)  # experts per MoE layer in vanilla; the unit of the pool budget
    pool_size: Optional[int] = bounded(None, 1)  # unset: full pool = MoE layers per pool * num_experts
    layers_per_pool: Optional[int] = bounded(None, 1)  # unset: all MoE layers share one pool
    moe_layer_interval: int = bounded(1, 1)  # layer i is MoE when (i + 1) % interval == 0
    expert_ffn_hidden_size: Optional[int] = bounded(None, 1)  # unset: granularity * model.ffn_hidden_size
    granularity: float = bounded(1.0, 0.0, exclusive_low=True)
    top_k: int = bounded(1, 1)
    shared_expert_ffn_hidden_size: int = bounded(0, 0)  # 0: no shared (always-on) expert
    router: Literal["softmax", "sigmoid", "norm"] = "norm"
    # the router's logits GEMM in TF32 on CUDA (10-bit mantissa inputs, fp32 sums; all else stays fp32): its
    # fp32 FLOPs grow with the pool (2 x tokens x hidden x experts forward, twice that backward)
    router_tf32: bool = False
    softmax_before_topk: bool = True  # False: top-k on logits, softmax over the k (Mixtral)
    normalize_gates: bool = False  # renormalise the k gates to sum 1 (softmax-then-top-k, sigmoid)
    norm_router_c: Optional[float] = bounded(None, 0.0, exclusive_low=True)  # unset: Monte-Carlo estimate (design note)
    aux_loss: Literal["none", "layer", "pool"] = "pool"
    aux_loss_coeff: float = bounded(1e-2, 0.0)
    pool_aux_lag: Literal["step", "micro_batch"] = "step"
    z_loss_coeff: float = bounded(0.0, 0.0)
    bias_balancing: bool = False  # aux-loss-free: selection bias updated after each optimizer step
    bias_update_rate: float = bounded(1e-3, 0.0)
    capacity_factor: Optional[float] = bounded(None, 0.0, exclusive_low=True)  # unset: dropless
    # UniPool-lock (moe/lock.py): after lock_start_step each pool expert belongs to one layer
    lock_start_step: Optional[int] = bounded(None, 1)  # unset: no lock
    lock_window_steps: int = bounded(50, 1)  # routing mass summed over the steps before the lock
    lock_anneal_steps: int = bounded(100, 0)  # penalty ramp on other layers' experts, then a hard mask
    # the ramp's final penalty: on the raw logits (softmax, sigmoid), on the unit-norm logits in [-1, 1]
    # (norm: any penalty of 1 or more already takes every other layer's expert out by the ReLU)
    lock_penalty: float = bounded(10.0, 0.0)
    lock_entropy_coeff: float = bounded(0.0, 0.0)  # target-cardinality entropy loss (pool experts / layers)

    def is_moe_layer(self, layer: int) -> bool:
        return self.kind != "dense" and (layer + 1) % self.moe_layer_interval == 0

    def moe_layers(self, num_layers: int) -> list[int]:
        return [i for i in range(num_layers) if self.is_moe_layer(i)]

    def pool_layout(self, num_layers: int) -> list[list[int]]:
        """The MoE layers of each pool, in order: one pool per layer for vanilla."""
        layers = self.moe_layers(num_layers)
        if not layers:
            return []
        if self.kind == "vanilla":
            return [[layer] for layer in layers]
        group = self.layers_per_pool or len(layers)
        return [layers[i : i + group] for i in range(0, len(layers), group)]

    def pool_stages(self, num_layers: int, pp: int) -> list[tuple[int, ...]]:
        """For each pool, the pipeline stages (of `pp`) whose layers use it: its replicas' process groups."""
        return [tuple(stage for stage in range(pp) if set(stage_layers(num_layers, pp, stage)) & set(layers))
                for layers in self.pool_layout(num_layers)]

    def experts_per_pool(self, num_layers: int) -> int:
        if self.kind == "vanilla":
            return self.num_experts
        if self.pool_size is not None:
            return self.pool_size
        return len(self.pool_layout(num_layers)[0]) * self.num_experts

    def expert_width(self, dense_ffn_width: int) -> int:
        if self.expert_ffn_hidden_size is not None:
            return self.expert_ffn_hidden_size
        return max(1, round(self.granularity * dense_ffn_width))

    @property
    def gate_is_always_one(self) -> bool:
        """Top-1 with the gate renormalised over the chosen expert (normalize_gates, or softmax after
        top-k): the LM loss then gives the routers no gradient, only the balancing losses train them."""
        return self.kind != "dense" and self.top_k == 1 and self.router != "norm" and (
            self.normalize_gates or (self.router == "softmax" and not self.softmax_before_topk))

    def inert_settings(self) -> list[str]:
        """Settings changed from their defaults that the others leave without effect. Notes, not errors: one
        --set (moe.aux_loss=none, moe.bias_balancing=false) switches a config's feature off, its knobs kept."""
        if self.kind == "dense":  # the whole section is inert, by design (a baseline via --set)
            return []
        unlocked = "moe.lock_start_step unset (no UniPool-lock)"
        inert_when = {
            "aux_loss_coeff": (self.aux_loss == "none", "moe.aux_loss='none'"),
            "pool_aux_lag": (self.aux_loss != "pool", f"moe.aux_loss={self.aux_loss!r}"),
            "bias_update_rate": (not self.bias_balancing, "moe.bias_balancing=false"),
            "lock_window_steps": (self.lock_start_step is None, unlocked),
            "lock_anneal_steps": (self.lock_start_step is None, unlocked),
            "lock_penalty": (self.lock_start_step is None, unlocked),
        }
        return [f"moe.{f.name}={getattr(self, f.name)!r} has no effect with {inert_when[f.name][1]}"
                for f in fields(self) if f.name in inert_when and inert_when[f.name][0]
                and getattr(self, f.name) != f.default]

    def active_losses(self) -> tuple[str, ...]:
        """The losses the MoE layers add to the training loss, by the names they report them under."""
        if self.kind == "dense":
            return ()
        active = {"aux_loss": self.aux_loss != "none", "z_loss": self.z_loss_coeff > 0,
                  "entropy_loss": self.lock_entropy_coeff > 0}
        return tuple(name for name in MOE_LOSSES if active[name])


@dataclass
class DataConfig:
    """Either the built-in corpus (tokenised once into `cache_dir`) or preprocessed prefixes. A prefix may be a
    blend, {prefix: weight, ...}: each file gives its weight's share of the samples (Megatron's data blend)."""

    corpus: Optional[Literal["shakespeare"]] = "shakespeare"
    train_prefix: Optional[str | Blend] = None  # from tools/preprocess_data.py
    valid_prefix: Optional[str | Blend] = None
    # a validation blend's files evaluated each on its own (Megatron's --multiple-validation-sets): a loss per file
    # over train.eval_batches global batches of its own, and the blend's loss as their mean weighted by the blend
    valid_per_file: bool = False
    tokenizer: str = "byte"  # byte | gpt2 | path to tokenizer.json (for the built-in corpus)
    cache_dir: str = "data_cache"


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision and evaluation.

    `global_batch` sequences make one optimizer step; they are processed `micro_batch` at a
    time, so gradient accumulation = global_batch / (micro_batch * data-parallel size).
    """

    max_steps: int = bounded(300, 1)
    global_batch: int = bounded(16, 1)
    micro_batch: int = bounded(16, 1)
    lr: float = bounded(2e-3, 0.0)
    min_lr: float = bounded(2e-4, 0.0)
    warmup_steps: int = bounded(20, 0)
    # after warm-up: a cosine or a line to min_lr at the last step, lr throughout (constant), or warmup-stable-decay:
    # lr until the last lr_cooldown_steps, then a line to min_lr (a stable-phase checkpoint extends by max_steps)
    lr_decay: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    lr_cooldown_steps: int = bounded(0, 0)  # wsd's decay
    lr_cooldown_shape: Literal["linear", "cosine", "minus_sqrt"] = "linear"  # minus_sqrt: 1 - sqrt(progress)
    weight_decay: float = bounded(0.01, 0.0)
    beta1: float = bounded(0.9, 0.0, 1.0, exclusive_high=True)  # 1 would never forget (AdamW refuses it)
    beta2: float = bounded(0.95, 0.0, 1.0, exclusive_high=True)
    adam_eps: float = bounded(1e-8, 0.0, exclusive_low=True)
    grad_clip: float = bounded(1.0, 0.0)  # 0 disables clipping
    # a step whose loss or gradient norm is NaN/inf is skipped (no update) and counted; this many
    # skipped steps in a row stop the run with an error
    max_consecutive_skips: int = bounded(5, 1)
    seed: int = bounded(1234, 0, 2**64 - 1)  # torch.manual_seed takes 64 bits
    # bitwise-reproducible kernels (torch.use_deterministic_algorithms): the layout-equivalence tests
    # rely on it. On GPUs it also sets CUBLAS_WORKSPACE_CONFIG and slows scatter-adds; the flash
    # attention backward (SDPA's or flash-attn's) stays non-deterministic (torch warns once)
    deterministic: bool = True
    precision: Literal["fp32", "bf16"] = "fp32"
    adamw: Literal["auto", "fused", "foreach", "apex"] = "auto"  # auto: torch's fused kernel
    # the language-model loss: a Triton kernel (auto: when Triton is importable, on CUDA) or F.cross_entropy in fp32
    cross_entropy: Literal["auto", "torch", "triton"] = "auto"
    eval_interval: int = bounded(100, 0)  # steps; 0 evaluates only at the end
    # validation sequences, in batches of global_batch (Megatron's eval_iters), evaluated micro_batch at a time:
    # the same sequences whatever micro_batch is, so validation losses compare across runs
    eval_batches: int = bounded(1, 1)

    def micro_batches(self, data_parallel: int) -> int:
        """Micro-batches each data-parallel rank runs per optimizer step."""
        return self.global_batch // (self.micro_batch * data_parallel)


@dataclass
class ParallelConfig:
    """Parallel degrees; data parallelism is what is left: dp = world / (tp * pp)."""

    tp: int = bounded(1, 1)
    pp: int = bounded(1, 1)
    ep: int = bounded(1, 1)  # expert-parallel ranks sharing one copy of each pool; divides dp
    timeout_s: float = bounded(600.0, 1.0)  # a collective waiting longer ends the job (a rank died)

    def data_parallel(self, world_size: int) -> int:
        return max(1, world_size // (self.tp * self.pp))

    def layout_errors(self, world_size: int) -> list[str]:
        """What keeps these degrees from fitting `world_size` processes (empty when they fit)."""
        if world_size % (self.tp * self.pp):
            return [f"world size {world_size} must be divisible by parallel.tp={self.tp} x parallel.pp={self.pp}"]
        dp = world_size // (self.tp * self.pp)
        if dp % self.ep:
            return [f"parallel.ep={self.ep} must divide the data-parallel size {dp} (world {world_size}"
                    f" / tp {self.tp} / pp {self.pp})"]
        return []


@dataclass
class DeepSpeedConfig:
    """The optimizer through `deepspeed.initialize` (engine, ZeRO) instead of the built-in AdamW.

    Batch sizes, AdamW hyperparameters, clipping and precision come from `train`, so they are
    written once; `config_file` names a ds_config JSON whose other keys (communication,
    logging, ZeRO bucket sizes, ...) are merged in.
    """

    enabled: bool = False
    zero_stage: int = bounded(0, 0, 2)  # 1 shards optimizer states, 2 also gradients (not with pp > 1)
    config_file: Optional[str] = None


@dataclass
class LoggingConfig:
    log_interval: int = bounded(10, 1)
    tensorboard: bool = True
    utilisation_interval: int = bounded(100, 0)  # pool heatmap image period; 0 = only at the end


@dataclass
class CheckpointConfig:
    save_interval: int = bounded(100, 0)  # steps; 0 saves only at the end
    keep_last: int = bounded(2, 1)
    resume: bool = True  # continue from the run directory's latest checkpoint when there is one
    # start from this checkpoint (a run, checkpoints/ or step_* directory) when the run directory has none of its
    # own to resume from
    load: Optional[str] = None
    # SIGTERM (a scheduler's preemption or time limit, passed on by torchrun) lets every rank finish the
    # step, save a checkpoint and exit 143; false: SIGTERM interrupts at once, as Ctrl-C (SIGINT) always does
    save_on_sigterm: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def consistency_errors(self, world_size: int | None = 1, stored: bool = False) -> list[str]:
        """Constraints between fields, each message naming the fields and their values.

        world_size None checks the config alone, for any world size (tools that inspect or write one); an int
        also checks that the parallel degrees fit that many processes. `stored`: the config of a checkpoint,
        which may hold a setting its run ignored when it was saved, before that setting was refused.
        """
        m, moe, t, p, d = self.model, self.moe, self.train, self.parallel, self.data
        errors = []

        def need(ok: bool, message: str):
            if not ok:
                errors.append(message)

        need(m.hidden_size % m.num_heads == 0,
             f"model.hidden_size={m.hidden_size} must be divisible by model.num_heads={m.num_heads}")
        need(m.num_heads % m.num_kv_heads == 0,
             f"model.num_heads={m.num_heads} must be divisible by model.num_kv_heads={m.num_kv_heads}")
        need(m.head_dim % 2 == 0, f"head dim model.hidden_size/model.num_heads={m.head_dim} must be even for RoPE")
        need(t.min_lr <= t.lr, f"train.min_lr={t.min_lr} must not exceed train.lr={t.lr}")
        if t.lr_decay == "wsd":
            need(t.lr_cooldown_steps >= 1, "train.lr_decay='wsd' needs train.lr_cooldown_steps >= 1 (the decay at the end"
                                           " of the run); without one use 'constant'")
            need(t.warmup_steps + t.lr_cooldown_steps <= t.max_steps,
                 f"train.warmup_steps={t.warmup_steps} + train.lr_cooldown_steps={t.lr_cooldown_steps} exceed"
                 f" train.max_steps={t.max_steps}: the cool-down would start during the warm-up")
        else:
            need(t.lr_cooldown_steps == 0, f"train.lr_cooldown_steps={t.lr_cooldown_steps} applies to"
                                           f" train.lr_decay='wsd' only, not {t.lr_decay!r}")
            need(t.lr_cooldown_shape == "linear", f"train.lr_cooldown_shape={t.lr_cooldown_shape!r} applies to"
                                                  f" train.lr_decay='wsd' only, not {t.lr_decay!r}")
        need(not (m.document_masking and m.attention == "flash"),
             "model.document_masking with model.attention='flash': flash-attn's causal kernel takes no document mask;"
             " use 'auto' or 'sdpa' (SDPA with the mask)")
        # a Triton kernel inside a compiled block would split its graph where torch.compile fuses the same work
        need(not (m.compile and m.rope_kernel == "triton"),
             "model.compile=true with model.rope_kernel='triton': the compiled attention fuses RoPE itself; set"
             " model.rope_kernel='torch' (or model.compile=false)")
        need(not (m.compile and m.swiglu_kernel == "triton" and len(moe.moe_layers(m.num_layers)) < m.num_layers),
             "model.compile=true with model.swiglu_kernel='triton': the dense FFN layers are compiled, which fuses"
             " their activation itself; set model.swiglu_kernel='torch' (or model.compile=false). With every layer an"
             " MoE layer the two combine: the experts are not compiled")
        if world_size is not None:
            errors.extend(p.layout_errors(world_size))
            dp = p.data_parallel(world_size)
            need(t.global_batch % (t.micro_batch * dp) == 0,
                 f"train.global_batch={t.global_batch} must be a multiple of train.micro_batch={t.micro_batch}"
                 f" x data-parallel size {dp}")
        else:  # whatever the data-parallel size
            need(t.global_batch % t.micro_batch == 0,
                 f"train.global_batch={t.global_batch} must be a multiple of train.micro_batch={t.micro_batch}")
        need(m.num_heads % p.tp == 0, f"model.num_heads={m.num_heads} must be divisible by parallel.tp={p.tp}")
        need(m.num_kv_heads % p.tp == 0,
             f"model.num_kv_heads={m.num_kv_heads} must be divisible by parallel.tp={p.tp}")
        need(m.num_layers % p.pp == 0, f"model.num_layers={m.num_layers} must be divisible by parallel.pp={p.pp}")
        need(m.vocab_size % p.tp == 0, f"model.vocab_size={m.vocab_size} must be divisible by parallel.tp={p.tp}"
             " (the vocabulary is split over tensor-parallel ranks)")
        need(not (m.tie_embeddings and p.pp > 1),
             f"model.tie_embeddings needs parallel.pp=1 (the embedding and output layer are on different stages"
             f" at pp={p.pp})")
        ds = self.deepspeed
        need(not (ds.enabled and ds.zero_stage == 2 and p.pp > 1),
             f"deepspeed.zero_stage=2 needs parallel.pp=1 (it reduces gradients during each backward, which"
             f" pipeline stages run at different times; use zero_stage 1 with pp={p.pp})")
        need(ds.config_file is None or ds.enabled, "deepspeed.config_file is set but deepspeed.enabled is false")
        need(ds.zero_stage == 0 or ds.enabled or stored, f"deepspeed.zero_stage={ds.zero_stage} is set"
             " but deepspeed.enabled is false (the built-in optimizer shards nothing): set deepspeed.enabled=true")
        need(not (ds.enabled and ds.zero_stage == 0 and t.precision == "bf16"),
             "deepspeed.zero_stage=0 with train.precision='bf16' is not supported (DeepSpeed's unfused bf16 optimizer"
             " looks expert groups up by a name ours do not have): use zero_stage 1 or 2, or the built-in optimizer")
        if p.tp > 1:  # dense FFNs and the shared expert are split over tensor-parallel ranks; routed experts are not
            need(len(moe.moe_layers(m.num_layers)) == m.num_layers or m.ffn_hidden_size % p.tp == 0,
                 f"model.ffn_hidden_size={m.ffn_hidden_size} must be divisible by parallel.tp={p.tp} (dense FFN layers"
                 " are split over tensor-parallel ranks)")
            need(moe.shared_expert_ffn_hidden_size % p.tp == 0,
                 f"moe.shared_expert_ffn_hidden_size={moe.shared_expert_ffn_hidden_size} must be divisible by"
                 f" parallel.tp={p.tp}")
        need(moe.pool_aux_lag != "micro_batch" or p.pp == 1,
             "moe.pool_aux_lag='micro_batch' needs parallel.pp=1: pipeline stages do not finish a micro-batch"
             " together; use 'step'")
        if world_size is not None and moe.pool_aux_lag == "micro_batch":
            dp = p.data_parallel(world_size)
            need(dp == 1, f"moe.pool_aux_lag='micro_batch' needs one data-parallel rank, not {dp}: the previous"
                          " micro-batch is another on every rank, so the run would depend on the layout; use 'step'")
        if d.corpus is None:
            need(d.train_prefix is not None and d.valid_prefix is not None,
                 "data.train_prefix and data.valid_prefix are required when data.corpus is null")
            for name in ("train_prefix", "valid_prefix"):
                blend = getattr(d, name)
                if isinstance(blend, dict):
                    need(len(blend) > 0, f"data.{name} is an empty blend: give at least one prefix and its weight")
                    need(all(weight > 0 for weight in blend.values()),
                         f"data.{name}: every weight of a blend must be > 0, got " + ", ".join(
                             f"{prefix!r}: {weight!r}" for prefix, weight in blend.items() if weight <= 0))
        else:
            need(d.train_prefix is None and d.valid_prefix is None,
                 f"data.corpus={d.corpus!r} and data.train_prefix/valid_prefix are exclusive: set data.corpus to null"
                 " to train on preprocessed files")
        need(not d.valid_per_file or (isinstance(d.valid_prefix, dict) and len(d.valid_prefix) > 1),
             "data.valid_per_file evaluates each file of a blend in data.valid_prefix on its own: give data.valid_prefix"
             " as {prefix: weight, ...} of several files")
        if moe.kind == "dense":  # no experts: the rest of the moe section does not apply (a baseline via --set)
            return errors
        # a routing option that does not apply to the chosen router would be silently ignored
        need(moe.softmax_before_topk or moe.router == "softmax",
             f"moe.softmax_before_topk=false (top-k on the logits, softmax over the k) applies to moe.router='softmax'"
             f" only, not {moe.router!r}")
        need(not (moe.normalize_gates and moe.router == "norm"),
             "moe.normalize_gates applies to the softmax and sigmoid routers: NormRouter gates are its raw scores")
        need(moe.norm_router_c is None or moe.router == "norm",
             f"moe.norm_router_c applies to moe.router='norm' only, not {moe.router!r}")
        need(moe.expert_ffn_hidden_size is None or moe.granularity == 1.0,
             f"moe.expert_ffn_hidden_size={moe.expert_ffn_hidden_size} and moe.granularity={moe.granularity} both set"
             " the expert width: set one")
        moe_layers = moe.moe_layers(m.num_layers)
        need(len(moe_layers) > 0,
             f"moe.moe_layer_interval={moe.moe_layer_interval} leaves no MoE layer in model.num_layers={m.num_layers}")
        if not moe_layers:
            return errors
        if moe.kind == "unipool" and moe.layers_per_pool is not None:
            need(len(moe_layers) % moe.layers_per_pool == 0,
                 f"moe.layers_per_pool={moe.layers_per_pool} must divide the {len(moe_layers)} MoE layers")
        if moe.kind == "vanilla":
            need(moe.pool_size is None and moe.layers_per_pool is None,
                 "moe.pool_size and moe.layers_per_pool apply to moe.kind='unipool' only; vanilla uses moe.num_experts")
            need(moe.aux_loss != "pool" or moe.aux_loss_coeff == 0.0,
                 "moe.aux_loss='pool' needs moe.kind='unipool'; vanilla MoE balances each layer ('layer')")
        experts = moe.experts_per_pool(m.num_layers)
        need(moe.top_k <= experts, f"moe.top_k={moe.top_k} exceeds the {experts} experts of a pool")
        if moe.lock_start_step is not None or moe.lock_entropy_coeff > 0:
            need(moe.kind == "unipool", "moe.lock_* (UniPool-lock) needs moe.kind='unipool'")
            layers_per_pool = len(moe.pool_layout(m.num_layers)[0])
            need(experts // layers_per_pool >= moe.top_k,
                 f"UniPool-lock gives each of the {layers_per_pool} layers of a pool {experts // layers_per_pool} of its"
                 f" {experts} experts, fewer than moe.top_k={moe.top_k}")
        if moe.lock_start_step is not None:
            need(moe.lock_window_steps <= moe.lock_start_step,
                 f"moe.lock_window_steps={moe.lock_window_steps} must not exceed moe.lock_start_step={moe.lock_start_step}")
        need(experts % p.ep == 0, f"{experts} experts per pool must be divisible by parallel.ep={p.ep}")
        if ds.enabled and ds.zero_stage >= 1 and p.pp > 1 and m.num_layers % p.pp == 0:
            # ZeRO computes the gradient norm one parameter group at a time, each with a collective over the
            # stages; a pool shared by a set of stages is its own group, so every stage must hold the same
            # number of them in the same order: one set per stage (UniPool: all stages; vanilla: its own)
            sets = set(moe.pool_stages(m.num_layers, p.pp))
            held = [sum(stage in stages for stages in sets) for stage in range(p.pp)]
            need(all(n == 1 for n in held),
                 f"deepspeed.zero_stage={ds.zero_stage} with parallel.pp={p.pp} needs the pools of every stage to be"
                 f" shared by one same set of stages, but the stages hold pools of {held} different stage sets (MoE"
                 " layers or pool boundaries do not line up with the stages): change moe.moe_layer_interval,"
                 " moe.layers_per_pool or parallel.pp, or use the built-in optimizer (deepspeed.enabled=false)")
            # bf16 ZeRO-1 is DeepSpeed's BF16_Optimizer: it adds the stages' pool norms over groups of one stage
            # per stage set (deepspeed_mpu.py), which only equally long sets can form
            lengths = sorted({len(stages) for stages in sets})
            need(t.precision != "bf16" or len(lengths) == 1,
                 f"deepspeed.zero_stage={ds.zero_stage} with train.precision='bf16' and parallel.pp={p.pp} needs the"
                 f" pools' stage sets equally long, to add each pool's gradient norm once; they span {lengths} stages:"
                 " change moe.layers_per_pool or parallel.pp, or use fp32 or the built-in optimizer")
        return errors

