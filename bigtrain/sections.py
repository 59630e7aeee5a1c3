"""Config machinery: strict, typed, round-trippable sections (RunConfig lives in bigtrain.train.run_config).

A run is configured by one YAML file plus dotted command-line overrides
(``train.lr=1e-3``). Each component owns a small frozen dataclass (a *section*) next to
its code; :class:`RunConfig` only composes them. Loading is strict: an unknown key, a
value of the wrong type or an inconsistent combination stops with the key path, the bad
value and a hint, as a :class:`ConfigError` (a :class:`~bigtrain.errors.UserError`).

Field documentation lives in ``field(metadata={"doc": ...})`` via :func:`doc_field`, so
the configuration reference can be generated from the code. Numeric bounds live there too
(``doc_field(1e-8, "...", gt=0)``) and are checked where a value is parsed; every float must be
finite, whatever its key, so keys added later are covered without a line of validation code.

Strict means strict: a key or section given twice in a YAML file, or the same key twice on the
command line, is an error naming the key (and, for files, both line numbers).
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union

import yaml

from bigtrain.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A configuration mistake: the message names the key path, the bad value and a hint."""


_BOUNDS = {"gt": (">", lambda v, b: v > b), "ge": (">=", lambda v, b: v >= b),
           "lt": ("<", lambda v, b: v < b), "le": ("<=", lambda v, b: v <= b)}


def doc_field(default: Any = dataclasses.MISSING, doc: str = "", *, gt: float | None = None, ge: float | None = None,
              lt: float | None = None, le: float | None = None, **kwargs: Any) -> Any:
    """A dataclass field with a one-line docstring (used by errors and the config reference) and optional
    numeric bounds (``gt``, ``ge``, ``lt``, ``le``), checked by :func:`parse_section`."""
    bounds = {name: bound for name, bound in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if bound is not None}
    metadata = {"doc": doc, "bounds": bounds}
    if isinstance(default, (list, dict, set)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def _check_bounds(value: Any, bounds: Mapping[str, float], path: str) -> None:
    if not bounds or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    failed = [f"{symbol} {bounds[name]:g}" for name, (symbol, ok) in _BOUNDS.items()
              if name in bounds and not ok(value, bounds[name])]
    if failed:
        wanted = " and ".join(f"{symbol} {bounds[name]:g}" for name, (symbol, _) in _BOUNDS.items() if name in bounds)
        raise ConfigError(f"{path}: must be {wanted}, got {value!r}.")


class Section:
    """Base class for config sections: strict construction from dicts and validation hooks."""

    # Every section is a @dataclass; declared here so a type[Section] is accepted by dataclasses.fields().
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def validate(self, path: str) -> None:
        """Check values that types alone cannot; raise ConfigError with the key path."""

    @classmethod
    def preprocess(cls, data: dict[str, Any], path: str) -> dict[str, Any]:
        """Hook to expand raw values (e.g. a named preset) before strict parsing."""
        return data


S = TypeVar("S", bound=Section)


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, tuple, Sequence):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin in (dict, Mapping):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert a YAML value to the declared type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [str(c) for c in choices], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"{path}: {value!r} is not a valid choice; expected one of "
            f"{', '.join(repr(c) for c in choices)}.{hint}"
        )
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        alternatives = [arg for arg in args if arg is not type(None)]
        if len(alternatives) == 1:  # ``X | None``: X's own error says more than "wrong type"
            return _coerce(value, alternatives[0], path)
        for arg in alternatives:
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{path}: {value!r} has the wrong type; expected {_type_name(tp)}.")
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list ({_type_name(tp)}), got {value!r}.")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}.")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, Section):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} keys, got {value!r}.")
        return parse_section(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected an integer, got {value!r}.")
    if tp is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string; accept it.
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"{path}: expected a number, got {value!r}.")
        if not math.isfinite(number):  # nan / inf would only surface later, as a traceback or a NaN loss
            raise ConfigError(f"{path}: must be a finite number, got {value!r}.")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: expected a string, got {value!r}.")
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # programmer error


def parse_section(cls: type[S], data: Mapping[str, Any], path: str = "") -> S:
    """Build section ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    data = cls.preprocess(dict(data), path)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f" Did you mean {_join(path, close[0])!r}?" if close else ""
            raise ConfigError(
                f"{_join(path, str(key))}: unknown key.{hint} "
                f"Valid keys here: {', '.join(sorted(fields))}."
            )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], _join(path, name))
            _check_bounds(kwargs[name], f.metadata.get("bounds", {}), _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(path, name)}: required key is missing ({f.metadata.get('doc', '')}).")
    section = cls(**kwargs)
    section.validate(path)
    return section


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def to_dict(section: Any) -> Any:
    """Plain-data (YAML/JSON-able) form of a section, recursively."""
    if dataclasses.is_dataclass(section):
        return {f.name: to_dict(getattr(section, f.name)) for f in dataclasses.fields(section)}
    if isinstance(section, (list, tuple)):
        return [to_dict(v) for v in section]
    if isinstance(section, dict):
        return {k: to_dict(v) for k, v in section.items()}
    return section


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value (e.g. train.lr=1e-3).")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key path component.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc}).") from None
    return parts, value


def check_unique_overrides(overrides: Sequence[str]) -> None:
    """Refuse a key given twice on a command line (it would silently be last-wins)."""
    seen: dict[str, str] = {}
    for text in overrides:
        parts, _ = parse_override(text)
        key = ".".join(parts)
        if key in seen:
            raise ConfigError(f"override {key} is given twice ({seen[key]!r} and {text!r}); keep one.")
        seen[key] = text


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply dotted overrides to a raw config mapping (validation happens afterwards). A later override of
    the same key wins: programs compose override lists; the command line is checked by
    :func:`check_unique_overrides`."""
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {text!r}: {'.'.join(parts[: depth + 1])} is a value, not a section."
                )
            node = child
        node[parts[-1]] = value
    return data


def _refuse_duplicate_keys(node: yaml.Node, path: str = "") -> None:
    """Walk a composed YAML document; a key given twice in one mapping (PyYAML keeps the last one
    silently) is a :class:`ConfigError` naming the dotted key and both lines."""
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise ConfigError(f"{_join(path, key)} is given twice (lines {first_line[key]} and {line}); the "
                                  f"second would silently replace the first. Keep one.")
            first_line[key] = line
            _refuse_duplicate_keys(value_node, _join(path, key))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{path}[{i}]")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping, with clear errors for missing/malformed files."""
    p = Path(path)
    if not p.is_file():
        shipped = ", ".join(sorted(x.name for x in Path("configs").glob("*.yaml"))) or "none found here"
        raise ConfigError(
            f"config file {str(p)!r} does not exist. Pass a path to a YAML file, e.g. configs/debug.yaml "
            f"(shipped configs: {shipped})."
        )
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {exc.strerror or exc}.") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text: byte 0x{raw[exc.start]:02x} on line {line} "
                          f"(saved in another encoding, such as latin-1?); save the file as UTF-8.") from None
    try:
        document = yaml.compose(text, Loader=yaml.SafeLoader)
        if document is not None:
            _refuse_duplicate_keys(document)
        data = yaml.safe_load(text)
    except ConfigError as exc:
        raise ConfigError(f"config file {str(p)!r}: {exc}") from None
    except yaml.YAMLError as exc:
        if "'\\t'" in str(exc) or "\\t" in str(getattr(exc, "problem", "") or ""):
            where = getattr(exc, "problem_mark", None)
            at = f" (line {where.line + 1})" if where is not None else ""
            raise ConfigError(f"config file {str(p)!r}: a TAB character in the indentation{at}; YAML must be "
                              f"indented with spaces.") from None
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections, got {type(data).__name__}.")
    return data


def config_hash(data: Mapping[str, Any]) -> str:
    """Short stable hash of a plain-data config."""
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def dump_yaml(data: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=False)
