"""Small helpers to read TOML configuration with actionable errors."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or wrong; the message says where."""


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration {path} is not valid TOML: {exc}") from None


def section(config: dict[str, Any], name: str, *, required: bool = False) -> dict[str, Any]:
    value = config.get(name)
    if value is None:
        if required:
            raise ConfigError(f"missing section [{name}]")
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table")
    return value


def get(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    """Read ``key`` from a table, check its type, apply a default when allowed."""
    if key not in table:
        if default is ...:
            raise ConfigError(f"missing key {key!r} in [{where}]")
        return default
    value = table[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(f"key {key!r} in [{where}] must be {kinds[0].__name__}, not a boolean")
    if isinstance(value, int) and float in kinds and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kinds):
        raise ConfigError(f"key {key!r} in [{where}] must be {' or '.join(k.__name__ for k in kinds)}")
    return value


def path(table: dict[str, Any], key: str, where: str, base: Path, default: Any = ...) -> Path:
    """A path key; relative paths are relative to the configuration file."""
    value = get(table, key, str, where, default)
    if value is None:
        return None  # type: ignore[return-value]
    return (base / value) if not Path(value).is_absolute() else Path(value)
