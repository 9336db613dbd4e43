"""Load a JSON config strictly: unknown keys, wrong types and out-of-range values are errors.

Every message names the field (`section.key`) and what it accepts, and all problems of a file
are reported together so a user fixes them in one pass.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Iterable

from .sections import Config


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message lists every problem."""


def _allowed(annotation) -> tuple[type, list[Any] | None, bool]:
    """(python type, literal choices or None, accepts None) of a field annotation."""
    optional = False
    args = [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
    (inner,) = args
    if typing.get_origin(inner) is typing.Literal:
        choices = list(typing.get_args(inner))
        return type(choices[0]), choices, optional
    return inner, None, optional


def _check_value(name: str, f: dataclasses.Field, annotation, value: Any) -> tuple[Any, str | None]:
    """The value converted to the field's type, or an error message naming the field."""
    kind, choices, optional = _allowed(annotation)
    if value is None:
        return (None, None) if optional else (None, f"{name}: null is not allowed")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            return None, f"{name}: integer too large for a float (the largest is about 1.8e308)"
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        return None, f"{name}: expected {kind.__name__}{' or null' if optional else ''}, got {type(value).__name__} {value!r}"
    if isinstance(value, float) and not math.isfinite(value):  # JSON NaN/Infinity: every range check passes them
        return None, f"{name}: {value!r} is not a finite number"
    if choices is not None and value not in choices:
        return None, f"{name}: {value!r} is not one of {', '.join(repr(c) for c in choices)}"
    low, high = f.metadata.get("min"), f.metadata.get("max")
    if low is not None and (value <= low if f.metadata.get("exclusive_min") else value < low):
        return None, f"{name}: {value!r} must be {'>' if f.metadata.get('exclusive_min') else '>='} {low}"
    if high is not None and (value >= high if f.metadata.get("exclusive_max") else value > high):
        return None, f"{name}: {value!r} must be {'<' if f.metadata.get('exclusive_max') else '<='} {high}"
    return value, None


def _sections() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(Config)}


def config_from_dict(raw: dict, world_size: int | None = 1) -> Config:
    """Build and validate a Config from nested dicts (as read from JSON)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a JSON object, got {type(raw).__name__}")
    errors: list[str] = []
    sections = _sections()
    built = {}
    for key in raw:
        if key not in sections:
            errors.append(f"unknown section {key!r}; sections are {', '.join(sections)}")
    for section, sf in sections.items():
        cls = sf.default_factory
        values = raw.get(section, {})
        if not isinstance(values, dict):
            errors.append(f"{section}: expected an object, got {type(values).__name__}")
            values = {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        annotations = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in values.items():
            if key not in fields:
                errors.append(f"unknown key {section}.{key}; {section} has {', '.join(fields)}")
                continue
            converted, error = _check_value(f"{section}.{key}", fields[key], annotations[key], value)
            if error:
                errors.append(error)
            else:
                kwargs[key] = converted
        built[section] = cls(**kwargs)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    config = Config(**built)
    errors = config.consistency_errors(world_size)
    if errors:
        raise ConfigError("inconsistent config:\n  " + "\n  ".join(errors))
    return config


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value), the value read for the field's type: JSON when it
    parses (a string field takes the text as written, so `data.cache_dir=2024` is the directory
    '2024'; null stays null), a number written the Python way (`.001`, `5.`, `02`) for a numeric
    field, else the text (which the field's check then refuses, naming it)."""
    path, sep, value = text.partition("=")
    section, dot, key = path.strip().partition(".")
    if not sep or not dot or not key:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.max_steps=100)")
    kind = _field_kind(section, key)
    value = value.strip()
    try:
        parsed = json.loads(value)
    except ValueError:  # not JSON (or an integer of more digits than Python converts)
        parsed = value
        if kind in (int, float):
            with contextlib.suppress(ValueError):
                parsed = kind(value)
    if kind is str and parsed is not None and not isinstance(parsed, str):
        parsed = value
    return section, key, parsed


def _field_kind(section: str, key: str) -> type | None:
    """The Python type of `section.key` (None for a name the config does not have: the loader names it)."""
    sf = _sections().get(section)
    if sf is None:
        return None
    annotation = typing.get_type_hints(sf.default_factory).get(key)
    return None if annotation is None else _allowed(annotation)[0]


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    """A copy of the raw config with each `section.key=value` set (validated later with the rest)."""
    merged = json.loads(json.dumps(raw))
    for text in overrides:
        section, key, value = parse_override(text)
        target = merged.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"cannot set {section}.{key}: {section} is not an object in the config")
        target[key] = value
    return merged


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (), world_size: int | None = 1) -> Config:
    """Read a JSON file (or start from the defaults), apply overrides, validate everything."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        raw = _read_json(path, "config file")
    config = _with_absolute_paths(config_from_dict(apply_overrides(raw, overrides), world_size))
    if config.deepspeed.config_file is not None:  # read only when the engine starts, after the model is built
        read_deepspeed_file(config)
    return config


BUILT_IN_TOKENIZERS = ("byte", "gpt2")


def _with_absolute_paths(config: Config) -> Config:
    """Relative paths mean the directory the command runs in; made absolute here, as the run's
    checkpoints store them, the tools that read a run's config (probe, plots, upcycling, possibly
    started elsewhere) find the same files instead of tokenising a corpus again or failing."""
    def absolute(path: str | None) -> str | None:
        return None if path is None else str(Path(path).expanduser().absolute())

    data, checkpoint, ds = config.data, config.checkpoint, config.deepspeed
    data.cache_dir, data.train_prefix, data.valid_prefix = map(absolute, (data.cache_dir, data.train_prefix,
                                                                          data.valid_prefix))
    if data.tokenizer not in BUILT_IN_TOKENIZERS:
        data.tokenizer = absolute(data.tokenizer)
    checkpoint.load, ds.config_file = absolute(checkpoint.load), absolute(ds.config_file)
    return config


def _read_json(path: Path, what: str) -> Any:
    """The JSON in a file, or a ConfigError naming it (unreadable, not UTF-8, not JSON)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_without_repeated_keys)
    except ValueError as e:  # JSONDecodeError, a repeated key, or an integer of more digits than Python converts
        raise ConfigError(f"{what} {path} is not valid JSON: {e}") from None


def _without_repeated_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object; a key given twice is an error (json keeps the last silently, dropping a whole section)."""
    counts = collections.Counter(key for key, _ in pairs)
    repeated = [key for key, n in counts.items() if n > 1]
    if repeated:
        raise ValueError(f"{', '.join(map(repr, repeated))} given more than once in one object (in the object with"
                         f" keys {', '.join(map(repr, counts))}); merge them into one")
    return dict(pairs)


def read_deepspeed_file(config: Config) -> dict:
    """The ds_config object `deepspeed.config_file` names; ConfigError when it is missing, malformed, or
    sets what the config decides to another value."""
    path = Path(config.deepspeed.config_file)
    if not path.is_file():
        raise ConfigError(f"deepspeed.config_file {path} does not exist; fix the path or unset it")
    extra = _read_json(path, "deepspeed.config_file")
    if not isinstance(extra, dict):
        raise ConfigError(f"deepspeed.config_file {path} must hold a JSON object, got {type(extra).__name__}")
    if not isinstance(extra.get("zero_optimization", {}), dict):
        raise ConfigError(f"deepspeed.config_file {path}: zero_optimization must be an object")
    agreeing = _deepspeed_values_from_config(config)

    def disagrees(key: str) -> bool:
        return extra[key] != "auto" and (key not in agreeing or extra[key] != agreeing[key])

    owned = [f"{key} (set {where})" for key, where in DEEPSPEED_KEYS_FROM_CONFIG.items()
             if key in extra and disagrees(key)]
    if extra.get("zero_optimization", {}).get("stage", config.deepspeed.zero_stage) != config.deepspeed.zero_stage:
        owned.append("zero_optimization.stage (set deepspeed.zero_stage)")
    if owned:
        raise ConfigError(f"deepspeed.config_file {path} sets what the run's config decides, to other values: remove"
                          f" {'; '.join(owned)}")
    return extra


def _deepspeed_values_from_config(config: Config) -> dict[str, Any]:
    """What a ds_config key the config decides may say and still agree with it ("auto" always does)."""
    train = config.train
    return {"train_batch_size": train.global_batch, "train_micro_batch_size_per_gpu": train.micro_batch,
            "gradient_clipping": train.grad_clip, "bf16": {"enabled": train.precision == "bf16"},
            "fp16": {"enabled": False}}


# ds_config keys generated from the run's own sections (training.backends.deepspeed_config): a
# config_file setting one to another value would contradict them, so it is refused, not silently
# overridden or ignored; an agreeing value or "auto" is accepted (the generated one is used)
DEEPSPEED_KEYS_FROM_CONFIG = {
    "train_batch_size": "train.global_batch",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.global_batch and train.micro_batch",
    "gradient_clipping": "train.grad_clip",
    "bf16": "train.precision",
    "fp16": "train.precision: fp32 or bf16",
    "amp": "train.precision: fp32 or bf16",
    "optimizer": "train.lr, beta1, beta2, adam_eps, weight_decay: DeepSpeed gets our AdamW",
    "scheduler": "train.lr, min_lr, warmup_steps: the schedule is ours",
    "managed_gradient_accumulation": "by the trainer, which runs the micro-batches itself",
    "zero_allow_untested_optimizer": "by the trainer",
}


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)
