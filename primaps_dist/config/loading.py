"""Reading a configuration: defaults, updated by a YAML file, then by ``section.key=value`` overrides.

Values are coerced to the type of the dataclass default; an unknown key, a wrong type or a file that is not a
YAML mapping is a one-line :class:`~primaps_dist.errors.ConfigError` / :class:`~primaps_dist.errors.UserError`
naming the dotted key or the file. Also: rebuilding a config stored in a checkpoint, writing one back as YAML,
and flattening it for MLflow params.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import yaml

from primaps_dist.config.sections import Config
from primaps_dist.errors import ConfigError, UserError


def _typed_value(value: Any, default: Any, key: str) -> Any:
    """Coerce a YAML value to the type of the dataclass default, or raise ConfigError naming ``key``."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected a boolean, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, f"expected a number, got {value!r}")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, f"expected a string, got {value!r}")
    if isinstance(default, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return list(value)
    raise ConfigError(key, f"unsupported value {value!r}")


def _list_item_default(section: Any, name: str) -> Any:
    hints = {f.name: f.type for f in dataclasses.fields(section)}
    hint = str(hints.get(name, ""))
    if "float" in hint:
        return 0.0
    if "int" in hint:
        return 0
    return ""


def _apply(section: Any, updates: dict[str, Any], prefix: str) -> None:
    """Set ``updates`` on the dataclass ``section`` with type checks; unknown keys are errors."""
    names = {f.name for f in dataclasses.fields(section)}
    for name, value in updates.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in names:
            raise ConfigError(key, f"unknown key (valid: {', '.join(sorted(names))})")
        current = getattr(section, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(key, f"expected a mapping of settings, got {value!r}")
            _apply(current, value, key)
            continue
        typed = _typed_value(value, current, key)
        if isinstance(current, list):
            item_default = _list_item_default(section, name)
            typed = [_typed_value(item, item_default, f"{key}[{i}]") for i, item in enumerate(typed)]
        setattr(section, name, typed)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise UserError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if value is None:
        value = ""
    return key.split("."), value


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- ``key.sub=value`` overrides, then validate. Raises ConfigError/UserError."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise UserError(f"config file {path}{where}: not valid YAML") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"config file {path}: top level must be a mapping of sections")
        _apply(cfg, loaded, "")
    apply_overrides(cfg, overrides)
    return cfg.validate()


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """Apply ``section.key=value`` strings (values parsed as YAML) in place; does not validate."""
    for text in overrides:
        parts, value = _parse_override(text)
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        _apply(cfg, nested, "")
    return cfg


def resolve_run_config(stored: dict[str, Any], path: str | os.PathLike | None, overrides: Sequence[str]) -> Config:
    """The config of a job that reads a checkpoint: ``path`` + overrides when given, else the config
    ``stored`` in the checkpoint + overrides; validated either way."""
    if path:
        return load_config(path, overrides)
    return apply_overrides(config_from_dict(stored), overrides).validate()


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config from :meth:`Config.to_dict` output (e.g. stored in a checkpoint), without file checks."""
    cfg = Config()
    _apply(cfg, values, "")
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat
