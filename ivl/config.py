"""YAML + dotted command-line overrides -> small typed dataclasses that validate themselves.

    cfg = load_config(SFTConfig, "configs/sft/demo.yaml", ["optim.lr=1e-4", "data.max_tiles=6"])

Each section is a dataclass; a section may define `validate(self)` that raises `ConfigError` with a message that says
what to do. Unknown keys are errors (with a did-you-mean), values are coerced to the annotated type.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from ivl.errors import ConfigError  # noqa: F401  re-exported

T = TypeVar("T")


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None, only: tuple[str, ...] = ()
) -> T:
    """Read `path` (YAML, optional), apply `key.sub=value` overrides, and build a validated `cls`.

    `only` keeps just those top-level sections of the file (e.g. `ivl data check` reads `model` and `data` from a
    full SFT config); overrides are never filtered, so a typo in one is still an error.
    """
    raw = read_yaml(path) if path is not None else {}
    if only:
        raw = {key: value for key, value in raw.items() if key in only}
    for override in overrides or []:
        apply_override(raw, override)
    return from_dict(cls, raw)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (`true`, `[1, 2]`, `null`, ...)."""
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} must look like section.key=value")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is a value, not a section")
        node = child
    try:
        node[leaf] = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        node[leaf] = value


def from_dict(cls: type[T], raw: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a plain dict, coercing and validating every field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = unknown[0]
        hint = difflib.get_close_matches(key, list(fields), n=1)
        suggestion = f" (did you mean '{prefix}{hint[0]}'?)" if hint else f"; valid keys: {', '.join(fields)}"
        raise ConfigError(f"unknown config key '{prefix}{key}'{suggestion}")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(raw[name], hints[name], f"{prefix}{name}") for name in fields if name in raw}
    try:
        instance = cls(**values)
    except TypeError as error:  # a required field is missing
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {error}") from error
    validate = getattr(instance, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as error:
            raise ConfigError(_prefixed(prefix, str(error))) from error
    return instance


def _prefixed(prefix: str, message: str) -> str:
    """A section's validation message under its dotted key: `lr must ...` under `optim.` is `optim.lr must ...`; a
    message that already names the section (`optim.lr must ...`) keeps it once."""
    sections = prefix.rstrip(".").split(".") if prefix else []
    for start in range(len(sections)):
        if message.startswith(".".join(sections[start:]) + "."):
            return ".".join([*sections[:start], message])
    return prefix + message


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, prefix=f"{key}.")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (arg for arg in args if arg is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {hint}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        item_hints = args if origin is tuple and args and args[-1] is not Ellipsis else (args[:1] or (Any,))
        if origin is tuple and len(item_hints) > 1 and len(item_hints) != len(value):
            raise ConfigError(f"{key}: expected {len(item_hints)} values, got {len(value)}")
        items = [
            _coerce(item, item_hints[i] if len(item_hints) > 1 else item_hints[0], f"{key}[{i}]")
            for i, item in enumerate(value)
        ]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        value_hint = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, value_hint, f"{key}.{k}") for k, v in value.items()}
    return _coerce_scalar(value, hint, key)


def _coerce_scalar(value: Any, hint: Any, key: str) -> Any:
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # no option means anything at inf or nan; a learning rate there trains NaNs
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        if hint is int:
            if not number.is_integer():
                raise ConfigError(f"{key}: expected an integer, got {value!r}")
            return int(number)
        return number
    if hint is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if isinstance(value, hint):
        return value
    raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain nested dicts/lists (tuples become lists), ready for YAML or JSON."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def format_config(config: Any) -> str:
    """The resolved config as YAML, for printing at the start of a run and saving beside its outputs."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)
