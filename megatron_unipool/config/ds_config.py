"""The ds_config DeepSpeed starts with: generated from the run's config and merged with the user's
`deepspeed.config_file`. What is generated and what a file may say about it are decided here
together, so a stock ds_config that repeats the run's values (or says "auto") is accepted and
one that contradicts them is refused, instead of one of the two being silently ignored. A
`scheduler` section is refused even with "auto" values: its type is a schedule (HF's stock files
say WarmupLR, constant after warmup), and the run's is train's warmup and cosine decay.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .json_files import ConfigError, is_file, json_kind, read_json
from .sections import Config

# ds_config keys the run's own sections decide, and where: a file may only repeat them or say "auto"
DEEPSPEED_KEYS_FROM_CONFIG = {
    "train_batch_size": "train.global_batch",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.global_batch and train.micro_batch",
    "gradient_clipping": "train.grad_clip",
    "bf16": "train.precision",
    "fp16": "train.precision: fp32 or bf16",
    "amp": "train.precision: fp32 or bf16",
    "torch_autocast": "train.precision: the trainer autocasts, and clips before a GradScaler would unscale",
    "optimizer": "train.lr, beta1, beta2, adam_eps, weight_decay: DeepSpeed gets our AdamW",
    "scheduler": "train.lr, min_lr, warmup_steps, lr_decay and its lr_cooldown_*: the schedule is ours",
    "managed_gradient_accumulation": "by the trainer, which runs the micro-batches itself",
    "zero_allow_untested_optimizer": "by the trainer",
}
# sections whose other keys (bf16 or ZeRO options) reach DeepSpeed beside the generated ones
MERGED_SECTIONS = ("bf16", "zero_optimization")
# options in them the trainer relies on (generated, and a file may not turn them off): DeepSpeed must find a
# step whose gradients are not finite, for the step to be skipped; without them it applies the update
NON_FINITE_CHECKS = {"bf16": {"check_grad_overflow": True}, "zero_optimization": {"compute_grad_norm": True}}


def deepspeed_config(config: Config, micro_batches: int) -> dict:
    """The ds_config for `deepspeed.initialize`; `micro_batches` per step on each data-parallel rank."""
    train, ds = config.train, config.deepspeed
    decided = _decided_values(config, micro_batches)  # the values a user's file is checked against
    generated = {key: decided[key] for key in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                               "gradient_accumulation_steps", "managed_gradient_accumulation",
                                               "zero_allow_untested_optimizer")}
    generated.update({section: {**decided[section], **required} for section, required in NON_FINITE_CHECKS.items()})
    generated.update({
        "gradient_clipping": train.grad_clip if ds.zero_stage > 0 else 0.0,  # stage 0: the backend clips
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    })
    if train.precision == "bf16":  # sum the micro-batches' gradients in fp32, as the built-in optimizer does
        # (DeepSpeed's default sums them in bf16: 0.8% off at 64 micro-batches); a file may say otherwise
        generated["data_types"] = {"grad_accum_dtype": "fp32"}
    if ds.config_file:
        extra = read_deepspeed_file(config, micro_batches)  # ConfigError naming the file, as at load time
        free = {key: value for key, value in extra.items() if key not in DEEPSPEED_KEYS_FROM_CONFIG}
        merged = {key: {**extra[key], **generated[key]} for key in MERGED_SECTIONS if isinstance(extra.get(key), dict)}
        generated = {**generated, **free, **merged}
    return generated


def read_deepspeed_file(config: Config, micro_batches: Optional[int] = None) -> dict:
    """The ds_config object `deepspeed.config_file` names; ConfigError when it is missing, malformed,
    or sets what the config decides to another value. `micro_batches` None (world size unknown)
    accepts any gradient_accumulation_steps."""
    path = Path(config.deepspeed.config_file)
    if not is_file(path, "deepspeed.config_file"):
        raise ConfigError(f"deepspeed.config_file {path} does not exist; fix the path or unset it")
    extra = read_json(path, "deepspeed.config_file")
    if not isinstance(extra, dict):
        raise ConfigError(f"deepspeed.config_file {path} must hold a JSON object, got {type(extra).__name__}")
    if "bfloat16" in extra:  # DeepSpeed's old name, read only where bf16 is absent: ours always sets bf16
        if "bf16" in extra:
            raise ConfigError(f"deepspeed.config_file {path} sets both bf16 and its old name bfloat16: keep bf16")
        extra["bf16"] = extra.pop("bfloat16")
    for section in MERGED_SECTIONS:
        if not isinstance(extra.get(section, {}), dict):
            raise ConfigError(f"deepspeed.config_file {path}: {section} must be an object")
    zero = extra.get("zero_optimization", {})
    for key in ("offload_optimizer", "offload_param"):
        if zero.get(key) is not None and not isinstance(zero[key], dict):
            raise ConfigError(f"deepspeed.config_file {path}: zero_optimization.{key} must be an object"
                              f" ({{\"device\": ...}}), got {json_kind(zero[key])}")
    offloaded = [key for key in ("offload_optimizer", "offload_param")  # {"device": "none"} is no offload
                 if (zero.get(key) or {}).get("device", "none") not in ("none", None)]
    # DeepSpeed still reads the deprecated booleans as offload_optimizer / offload_param {"device": "cpu"}
    offloaded += [key for key in ("cpu_offload", "cpu_offload_param") if zero.get(key) not in (None, False)]
    if offloaded:
        raise ConfigError(f"deepspeed.config_file {path} sets zero_optimization.{' and '.join(offloaded)}: ZeRO-Offload"
                          " needs DeepSpeed's CPU Adam, and the optimizer is the trainer's AdamW; remove it")
    decided = _decided_values(config, micro_batches)
    checked = [key for key in DEEPSPEED_KEYS_FROM_CONFIG if key in extra
               and (key != "gradient_accumulation_steps" or micro_batches is not None)]
    contradicted = [f"{name} (set {DEEPSPEED_KEYS_FROM_CONFIG[key]})" for key in checked
                    for name in _disagreements(extra[key], decided.get(key), key)]
    contradicted += [f"{name} (set deepspeed.zero_stage)" for name in _disagreements(
        extra.get("zero_optimization", {}), decided["zero_optimization"], "zero_optimization")]
    contradicted += [f"{name} (the trainer skips steps whose gradients are not finite)"
                     for section, required in NON_FINITE_CHECKS.items()
                     for name in _disagreements(extra.get(section, {}), required, section)]
    if contradicted:
        raise ConfigError(f"deepspeed.config_file {path} sets what the run's config decides, to other values: remove"
                          f" {'; '.join(contradicted)}")
    return extra


def _decided_values(config: Config, micro_batches: Optional[int]) -> dict[str, Any]:
    """The values of the keys the config decides, as a ds_config would write them."""
    train = config.train
    decided = {
        "train_batch_size": train.global_batch, "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_clipping": train.grad_clip, "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": False}, "amp": {"enabled": False}, "torch_autocast": {"enabled": False},
        "managed_gradient_accumulation": True, "zero_allow_untested_optimizer": True,  # as generated
        "optimizer": {"type": "adamw", "params": {"lr": train.lr, "betas": [train.beta1, train.beta2],
                                                  "eps": train.adam_eps, "weight_decay": train.weight_decay}},
        "zero_optimization": {"stage": config.deepspeed.zero_stage},
    }
    if micro_batches is not None:
        decided["gradient_accumulation_steps"] = micro_batches
    return decided


def _disagreements(given: Any, decided: Any, name: str) -> list[str]:
    """Dotted names where `given` contradicts `decided`: "auto" agrees at any depth, keys `decided`
    does not name inside a section are free, a key with no decided value (scheduler) agrees only as
    "auto", and names (the optimizer type) compare without case."""
    if given == "auto":
        return []
    if isinstance(decided, dict):
        if not isinstance(given, dict):
            return [name]
        return [bad for key in decided if key in given for bad in _disagreements(given[key], decided[key],
                                                                                  f"{name}.{key}")]
    if isinstance(decided, list):
        if not isinstance(given, list) or len(given) != len(decided):
            return [name]
        return [bad for i, (g, d) in enumerate(zip(given, decided)) for bad in _disagreements(g, d, f"{name}[{i}]")]
    if isinstance(decided, str) and isinstance(given, str):
        return [] if given.lower() == decided else [name]
    if isinstance(given, bool) or isinstance(decided, bool):  # true is not 1 here
        return [] if given is decided else [name]
    return [] if decided is not None and given == decided else [name]
