"""Load a JSON config strictly: unknown keys, wrong types and out-of-range values are errors.

Every message names the field (`section.key`) and what it accepts, and all problems of a file
are reported together so a user fixes them in one pass.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable

from .ds_config import read_deepspeed_file
from .json_files import ConfigError, is_file, json_kind, read_json
from .sections import Config, as_blend


def _allowed(annotation) -> tuple[tuple[type, ...], list[Any] | None, bool]:
    """(python types, literal choices or None, accepts None) of a field annotation; a `dict[str, float]` (a
    data blend) is dict, its values checked by _check_value."""
    optional = False
    args = [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
    if typing.get_origin(args[0]) is typing.Literal:
        choices = list(typing.get_args(args[0]))
        return (type(choices[0]),), choices, optional
    return tuple(typing.get_origin(a) or a for a in args), None, optional


def _as_float(name: str, value: Any) -> tuple[Any, str | None]:
    """A JSON number as a finite float, or an error naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"{name}: expected a number, got {json_kind(value)} {value!r}"
    try:
        value = float(value)
    except OverflowError:
        return None, f"{name}: integer too large for a float (the largest is about 1.8e308)"
    if not math.isfinite(value):  # JSON NaN/Infinity: every range check passes them
        return None, f"{name}: {value!r} is not a finite number"
    return value, None


def _check_value(name: str, f: dataclasses.Field, annotation, value: Any) -> tuple[Any, str | None]:
    """The value converted to the field's type, or an error message naming the field."""
    kinds, choices, optional = _allowed(annotation)
    if value is None:
        return (None, None) if optional else (None, f"{name}: null is not allowed")
    if kinds == (float,) and isinstance(value, (int, float)) and not isinstance(value, bool):
        value, error = _as_float(name, value)  # a finite float, or the error
        if error:
            return None, error
    if not isinstance(value, kinds) or (kinds == (int,) and isinstance(value, bool)):
        expected = " or ".join("object" if kind is dict else kind.__name__ for kind in kinds)
        return None, f"{name}: expected {expected}{' or null' if optional else ''}, got {type(value).__name__} {value!r}"
    if isinstance(value, dict):  # a blend: {prefix: weight}
        weights = {key: _as_float(f"{name}[{key!r}]", weight) for key, weight in value.items()}
        errors = [error for _, error in weights.values() if error]
        return (None, "\n  ".join(errors)) if errors else ({key: w for key, (w, _) in weights.items()}, None)
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


def config_from_dict(raw: dict, world_size: int | None = 1, stored: bool = False) -> Config:
    """Build and validate a Config from nested dicts (as read from JSON); `stored`: a checkpoint's (see
    Config.consistency_errors)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a JSON object, got {json_kind(raw)}")
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
            errors.append(f"{section}: expected an object, got {json_kind(values)}")
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
    errors = config.consistency_errors(world_size, stored)
    if errors:
        raise ConfigError("inconsistent config:\n  " + "\n  ".join(errors))
    return config


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value), the value read for the field's type: JSON when it
    parses (a string field takes the text as written, so `data.cache_dir=2024` is the directory
    '2024'; null stays null; a prefix field takes a JSON object as a blend), a number written the Python way
    (`.001`, `5.`, `02`) for a numeric field, else the text (which the field's check then refuses, naming it)."""
    path, sep, value = text.partition("=")
    section, dot, key = path.strip().partition(".")
    if not sep or not dot or not key:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.max_steps=100)")
    kinds = _field_kinds(section, key)
    value = value.strip()
    try:
        parsed = json.loads(value)
    except ValueError:  # not JSON (or an integer of more digits than Python converts)
        parsed = value
        if kinds in ((int,), (float,)):
            with contextlib.suppress(ValueError):
                parsed = kinds[0](value)
    # a blend's JSON object stays one, and a JSON list there (Megatron's [weight, path, ...]) is refused as a blend,
    # not taken for a path named "[...]"
    mistaken_blend = dict in kinds and isinstance(parsed, list)
    if str in kinds and parsed is not None and not isinstance(parsed, kinds) and not mistaken_blend:
        parsed = value
    return section, key, parsed


def overridden_fields(overrides: Iterable[str]) -> set[tuple[str, str]]:
    """The (section, key) each `section.key=value` override sets."""
    return {parse_override(text)[:2] for text in overrides}


def _field_kinds(section: str, key: str) -> tuple[type, ...]:
    """The Python types of `section.key` (none for a name the config does not have: the loader names it)."""
    sf = _sections().get(section)
    if sf is None:
        return ()
    annotation = typing.get_type_hints(sf.default_factory).get(key)
    return () if annotation is None else _allowed(annotation)[0]


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
        if not is_file(path, "config file"):
            if path.is_dir():
                inside = path / "config.json"
                raise ConfigError(f"config file {path} is a directory" + (f": pass {inside}" if inside.is_file() else ""))
            raise ConfigError(f"config file {path} does not exist")
        raw = read_json(path, "config file")
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a JSON object of sections, not {json_kind(raw)}")
    config = _with_absolute_paths(config_from_dict(apply_overrides(raw, overrides), world_size))
    if config.deepspeed.config_file is not None:  # found wrong now, not after the model is built
        micro_batches = (None if world_size is None
                         else config.train.micro_batches(config.parallel.data_parallel(world_size)))
        read_deepspeed_file(config, micro_batches)
    return config


def with_overrides(config: Config, overrides: Iterable[str]) -> Config:
    """`config` with `section.key=value` overrides, validated as a tool's config (no world size), its paths
    absolute as load_config makes them (a tool writing a run's config.json from a checkpoint's config)."""
    return _with_absolute_paths(config_from_dict(apply_overrides(config_to_dict(config), overrides), None))


BUILT_IN_TOKENIZERS = ("byte", "gpt2")


def _with_absolute_paths(config: Config) -> Config:
    """Relative paths mean the directory the command runs in; made absolute here, as the run's
    checkpoints store them, the tools that read a run's config (probe, plots, upcycling, possibly
    started elsewhere) find the same files instead of tokenising a corpus again or failing."""
    data, checkpoint, ds = config.data, config.checkpoint, config.deepspeed
    data.cache_dir = _absolute("data.cache_dir", data.cache_dir, instead=None)
    data.train_prefix = _absolute_prefixes("data.train_prefix", data.train_prefix)
    data.valid_prefix = _absolute_prefixes("data.valid_prefix", data.valid_prefix)
    both = _entries_by_file(data.train_prefix).keys() & _entries_by_file(data.valid_prefix).keys()
    if both:  # a rule for starting a run, checked on the files the paths name: not on a checkpoint's config
        raise ConfigError(f"data.train_prefix and data.valid_prefix both read {', '.join(sorted(both))}: validating on"
                          " the training data measures memorisation; hold documents out"
                          " (tools/preprocess_data.py --valid-fraction)")
    if data.tokenizer not in BUILT_IN_TOKENIZERS:
        data.tokenizer = _absolute("data.tokenizer", data.tokenizer, instead=" or ".join(BUILT_IN_TOKENIZERS))
    checkpoint.load = _absolute("checkpoint.load", checkpoint.load)
    ds.config_file = _absolute("deepspeed.config_file", ds.config_file)
    return config


def _absolute(field: str, path: str | None, instead: str | None = "null for none") -> str | None:
    if path is None:
        return None
    if not path.strip():  # Path("") is the working directory: `--set checkpoint.load=` would load from it
        raise ConfigError(f"{field} is empty: give a path" + (f", or {instead}" if instead else ""))
    try:
        return str(Path(path).expanduser().absolute())
    except RuntimeError as error:  # ~name of no known user
        raise ConfigError(f"{field}={path!r}: {error}") from error


def _absolute_prefixes(field: str, prefix: str | dict | None) -> str | dict | None:
    """A prefix, or each prefix of a blend, made absolute; two entries of a blend naming one file (`a` and
    `d/../a`, or a link to it) are an error: it would be read twice as often, each sample twice in a row."""
    if not isinstance(prefix, dict):
        return _absolute(field, prefix)
    blend = {_absolute(f"{field}[{entry!r}]", entry, instead=None): weight for entry, weight in prefix.items()}
    repeated = next((entries for entries in _entries_by_file(prefix).values() if len(entries) > 1), None)
    if repeated:
        raise ConfigError(f"{field} names one file twice ({repeated[0]!r} and {repeated[1]!r}): give it once, with"
                          " the sum of their weights")
    return blend


def _entries_by_file(prefix: str | dict | None) -> dict[str, list[str]]:
    """{the file a prefix names, links and `..` resolved: the prefixes naming it}."""
    entries: dict[str, list[str]] = {}
    for entry in ([] if prefix is None else as_blend(prefix)):
        entries.setdefault(os.path.realpath(Path(entry).expanduser()), []).append(entry)
    return entries


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)
