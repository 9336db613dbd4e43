"""Strict JSON reading for configs and ds_configs: every failure is a ConfigError naming the file."""
from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message lists every problem."""


def is_file(path: Path, what: str) -> bool:
    """Path.is_file, where a path that cannot even be looked at (too long, EACCES on a parent, ESTALE: is_file
    raises for those) is a ConfigError naming it, as read_json names one that cannot be read."""
    try:
        return path.is_file()
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read: {e.strerror or e}") from None


def read_json(path: Path, what: str) -> Any:
    """The JSON in a file, or a ConfigError naming it (unreadable, not UTF-8, not JSON)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark (some Windows editors) is not JSON: dropped
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_without_repeated_keys)
    except ValueError as e:  # JSONDecodeError, a repeated key, or an integer of more digits than Python converts
        raise ConfigError(f"{what} {path} is not valid JSON: {e}") from None


def json_kind(value: Any) -> str:
    """What JSON calls the kind of a parsed value: "an array", "null", ..."""
    kinds = ((bool, "a boolean"), (dict, "an object"), (list, "an array"), (str, "a string"), ((int, float), "a number"))
    return "null" if value is None else next(name for kind, name in kinds if isinstance(value, kind))


def _without_repeated_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object; a key given twice is an error (json keeps the last silently, dropping a whole section)."""
    counts = collections.Counter(key for key, _ in pairs)
    repeated = [key for key, n in counts.items() if n > 1]
    if repeated:
        raise ValueError(f"{', '.join(map(repr, repeated))} given more than once in one object (in the object with"
                         f" keys {', '.join(map(repr, counts))}); merge them into one")
    return dict(pairs)
