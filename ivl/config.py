"""YAML + dotted command-line overrides -> small typed dataclasses that validate themselves.

    cfg = load_config(SFTConfig, "configs/sft/demo.yaml", ["optim.lr=1e-4", "data.max_tiles=6"])

Each section is a dataclass; a section may define `validate(self)` that raises `ConfigError` with a message that says
what to do. Unknown keys are errors (with a did-you-mean), values are coerced to the annotated type.

Every field is declared with its help, `lr: float = option(1e-4, "peak learning rate")`, and every nested section
with `section(OptimConfig)` (its help is the class docstring's first line). The help is field metadata rather than
attribute docstrings read back from the source (as litgpt does): it needs no source file and no parser, and it sits
on the field itself, so `ivl sft --help` (`options_help`) and `--show-config` (`format_config`) read it directly.
The config classes live in torch-free modules (`ivl/options.py`, `finetune/options.py`, `distill/options.py`) so
that the help is available without importing torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from ivl.errors import ConfigError  # noqa: F401  re-exported

T = TypeVar("T")
HELP = "help"  # the metadata key of a field's help


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None) -> Any:
    """A config field with its one line of help: `lr: float = option(1e-4, "peak learning rate")`;
    `factory=list` for a mutable default."""
    if not help:
        raise TypeError("option(): every config field needs its help")
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={HELP: help})
    return dataclasses.field(default=default, metadata={HELP: help})


def section(cls: type, factory: Callable[[], Any] | None = None, help: str = "") -> Any:
    """A nested config section (a dataclass) with its default; its help is `help`, else the class docstring's first
    paragraph."""
    return dataclasses.field(default_factory=factory or cls, metadata={HELP: help or summary(cls)})


def summary(cls: type) -> str:
    """The first paragraph of a class docstring, on one line ('' when the class has its own none)."""
    doc = cls.__dict__.get("__doc__") or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


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
        renamed = getattr(cls, "RENAMED", {})  # old key -> its new dotted key, for keys that moved
        if key in renamed:
            raise ConfigError(f"config key '{prefix}{key}' is now '{renamed[key]}': rename it")
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
    """The resolved config as YAML with every key's help as a comment: printed by `--show-config`, and loadable
    again as it is."""
    return "".join(f"{line}\n" for line in _yaml_lines(config, ""))


def _yaml_lines(config: Any, indent: str) -> list[str]:
    lines = []
    for field in dataclasses.fields(config):
        value, help = getattr(config, field.name), field.metadata.get(HELP, "")
        comment = f"  # {help}" if help else ""
        if dataclasses.is_dataclass(value):
            lines += [f"{indent}{field.name}:{comment}", *_yaml_lines(value, indent + "  ")]
        else:
            lines.append(f"{indent}{field.name}: {yaml_value(value)}{comment}")
    return lines


def yaml_value(value: Any) -> str:
    """One value as inline YAML (`null`, `0.0001`, `[0.9, 0.999]`, `'preset:tiny'`)."""
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=2**31)
    return text.removesuffix("\n").removesuffix("\n...")  # a plain scalar ends with YAML's document-end marker


@dataclasses.dataclass(frozen=True)
class OptionDoc:
    """One option of a config: its dotted key, type, default and help."""

    key: str
    type: str
    default: str
    help: str


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[OptionDoc]:
    """Every option of config class `cls`, nested sections included, in declaration order. A section's own row
    (type `section`) comes before its options."""
    defaults = cls() if defaults is None else defaults
    hints = typing.get_type_hints(cls)
    docs = []
    for field in dataclasses.fields(cls):
        key, help = f"{prefix}{field.name}", field.metadata.get(HELP, "")
        value, nested = getattr(defaults, field.name), _section_class(hints[field.name])
        if nested is not None:
            docs.append(OptionDoc(key, "section" if value is not None else "section or null", "", help))
            docs += describe(nested, f"{key}.", value)
        else:
            docs.append(OptionDoc(key, type_name(hints[field.name]), yaml_value(value), help))
    return docs


def _section_class(hint: Any) -> type | None:
    """The dataclass a field's type names (also through `X | None`), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (Union, types.UnionType):
        classes = [arg for arg in typing.get_args(hint) if dataclasses.is_dataclass(arg)]
        return classes[0] if classes else None
    return None


def type_name(hint: Any) -> str:
    """A type as a user reads it: `float`, `str or null`, `cosine|linear|constant`, `list of int`, `[float, float]`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "|".join(str(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if arg is type(None) else type_name(arg) for arg in args)
    if origin is list or (origin is tuple and args[-1:] == (Ellipsis,)):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is tuple:
        return f"[{', '.join(type_name(arg) for arg in args)}]"
    if origin is dict:
        return "mapping"
    return getattr(hint, "__name__", str(hint))


OPTIONS_HEADING = "options (keys of the YAML config, or on the command line as section.key=value):"


def options_help(cls: type, only: tuple[str, ...] = (), heading: str = OPTIONS_HEADING) -> str:
    """The options of config class `cls` (or of its top-level sections `only`) for a command's --help, under
    `heading`: per option the dotted key, type, default and help."""
    lines = [heading]
    for doc in describe(cls):
        if only and doc.key.split(".")[0] not in only:
            continue
        if doc.type.startswith("section"):
            lines += ["", f"{doc.key}: {doc.help}" + (" (may be null)" if doc.type != "section" else "")]
        else:
            if "." not in doc.key and lines[-1].startswith("      "):
                lines.append("")  # a top-level option after a section's options
            lines += [f"  {doc.key} ({doc.type}, default {doc.default})", f"      {doc.help}"]
    return "\n".join(lines)
