"""Strict, typed training configs built from dataclass defaults, a TOML file and ``--set key=value`` overrides.

A trainer declares its options once, as a dataclass whose field defaults are the only defaults there are. Values then
come, in rising precedence, from those defaults, an optional TOML file and repeated ``--set key=value`` strings. Every
value is coerced to its field's type; an unknown key or a value that does not fit is an `InvalidInputError` that names
the key. A config class may define ``validate(self) -> None`` for ranges; the ``expect_*`` helpers below give the
messages one shape::

    @dataclass(frozen=True)
    class LoraConfig:
        rank: int = 4
        lr: float = 1e-4

        def validate(self) -> None:
            expect_positive(self, "rank", "lr")

    cfg = load_config(LoraConfig, toml_path="job.toml", overrides=["rank=8"])
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from studio.errors import InvalidInputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib

__all__ = [
    "ALLOW_NONFINITE",
    "config_from_dict",
    "config_keys",
    "config_to_dict",
    "expect_in_range",
    "expect_non_negative",
    "expect_positive",
    "load_config",
    "parse_overrides",
]

C = TypeVar("C")

# Field metadata flag for float fields that may legitimately hold NaN or +-inf (``field(metadata=ALLOW_NONFINITE)``).
ALLOW_NONFINITE: Mapping[str, bool] = types.MappingProxyType({"allow_nonfinite": True})

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null", ""}


def config_keys(cls: type) -> list[str]:
    """The option names of a config class, in declaration order."""
    _require_dataclass(cls)
    return [f.name for f in dataclasses.fields(cls) if f.init]


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """Turn ``["rank=8", "lr=1e-4"]`` into ``{"rank": "8", "lr": "1e-4"}``; dashes in keys become underscores.

    >>> parse_overrides(["rank=8", "train-text-encoder=true"])
    {'rank': '8', 'train_text_encoder': 'true'}
    """
    parsed: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise InvalidInputError(f"--set expects key=value, got {item!r}")
        parsed[key] = value.strip()
    return parsed


def load_config(
    cls: type[C],
    *,
    recipe: Mapping[str, Any] | None = None,
    toml_path: str | Path | None = None,
    values: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> C:
    """Build a config: field defaults, then the base model's ``recipe`` (a trainer's measured defaults for that
    model), then the TOML file, then ``values`` (e.g. from a UI), then ``--set`` overrides.

    Raises `InvalidInputError` for an unreadable TOML file, an unknown key (with close matches), a value that does
    not fit its field's type, or a failed ``validate()``.

    >>> cfg = load_config(LoraConfig, overrides=["rank=8"])  # doctest: +SKIP
    """
    _require_dataclass(cls)
    merged: dict[str, Any] = dict(recipe or {})
    if toml_path is not None:
        merged.update(_read_toml(Path(toml_path)))
    if values:
        merged.update(values)
    merged.update(parse_overrides(overrides))
    return config_from_dict(cls, merged)


def recipe_for(recipes: Mapping[str, Mapping[str, Any]], base: str | None) -> dict[str, Any]:
    """A trainer's measured recipe for the base model ``base`` (``recipes`` keyed by base model; ``None``, ``tiny`` and
    the embedded model's folder all mean ``tiny``), as a new dict: ``{}`` for a base model with none.

    >>> recipe_for({"tiny": {"steps": 300}}, None), recipe_for({"tiny": {"steps": 300}}, "my/sd15")
    ({'steps': 300}, {})
    """
    from studio.base_models import canonical_base_name

    return dict(recipes.get(canonical_base_name(base), {}))


def config_from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
    """Build a config from a mapping of option name to value (strings are coerced); missing options keep defaults.

    This is the strict core of `load_config` and also reads back what `config_to_dict` wrote.
    """
    _require_dataclass(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for raw_key, raw_value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in fields:
            raise InvalidInputError(_unknown_key_message(key, list(fields), cls.__name__))
        field = fields[key]
        allow_nonfinite = bool(field.metadata.get("allow_nonfinite", False))
        kwargs[key] = _coerce(key, raw_value, hints[key], allow_nonfinite)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise InvalidInputError(f"config {cls.__name__} needs a value for {', '.join(repr(m) for m in missing)}")
    config = cls(**kwargs)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """The effective config as a JSON-safe dict (tuples become lists, paths strings, non-finite floats strings).

    >>> json.dumps(config_to_dict(cfg))  # doctest: +SKIP
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config_to_dict expects a dataclass instance, got {type(config).__name__}")
    return {f.name: _json_safe(getattr(config, f.name)) for f in dataclasses.fields(config)}


# --- validate() helpers: one message shape for range errors -------------------------------------------------------


def expect_positive(config: Any, *names: str) -> None:
    """Raise unless each named option is > 0: ``config key 'rank' expects a positive int, got '0'``."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise InvalidInputError(f"config key {name!r} expects a positive {_kind(value)}, got '{value}'")


def expect_non_negative(config: Any, *names: str) -> None:
    """Raise unless each named option is >= 0."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not value >= 0:
            raise InvalidInputError(f"config key {name!r} expects a non-negative {_kind(value)}, got '{value}'")


def expect_in_range(config: Any, name: str, low: float, high: float) -> None:
    """Raise unless ``low <= option <= high``."""
    value = getattr(config, name)
    if value is not None and not low <= value <= high:
        raise InvalidInputError(f"config key {name!r} expects a {_kind(value)} in [{low}, {high}], got '{value}'")


# --- internals -----------------------------------------------------------------------------------------------------


def _require_dataclass(cls: type) -> None:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"expected a dataclass config class, got {cls!r}")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise InvalidInputError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise InvalidInputError(f"config file {path} is not valid TOML: {error}") from None
    for key, value in data.items():
        # Tables would be silently unused with a flat config: name them instead.
        if isinstance(value, dict):
            raise InvalidInputError(f"config file {path}: expected plain 'key = value' options, found a table [{key}]")
    return data


def _unknown_key_message(key: str, known: list[str], class_name: str) -> str:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else f"known keys: {', '.join(known)}"
    return f"unknown config key {key!r} for {class_name}; {hint}"


def _kind(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float"}.get(type(value), "number")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("none" if a is type(None) else _type_name(a) for a in get_args(tp))
    if origin in (tuple, list):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"comma-separated list of {_type_name(args[0]) if args else 'str'}"
    return getattr(tp, "__name__", str(tp))


def _bad(key: str, tp: Any, value: Any) -> InvalidInputError:
    return InvalidInputError(f"config key {key!r} expects {_a(_type_name(tp))}, got '{value}'")


def _a(name: str) -> str:
    if name.startswith(("one of", "comma")):
        return name
    return ("an " if name[:1] in "aeiou" else "a ") + name


def _coerce(key: str, value: Any, tp: Any, allow_nonfinite: bool) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE and type(None) in args):
            if type(None) in args:
                return None
            raise _bad(key, tp, value)
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:
            # Optional[X]: X's own message ("expects a finite float") is more precise than a generic one.
            return _coerce(key, value, options[0], allow_nonfinite)
        for arg in options:
            try:
                return _coerce(key, value, arg, allow_nonfinite)
            except InvalidInputError:
                continue
        raise _bad(key, tp, value)
    if origin is Literal:
        choices = get_args(tp)
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value.strip()):
                return choice
        raise _bad(key, tp, value)
    if origin in (tuple, list):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        item_type = args[0] if args else str
        if isinstance(value, str):
            items: list[Any] = [part.strip() for part in value.split(",") if part.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise _bad(key, tp, value)
        coerced = [_coerce(key, item, item_type, allow_nonfinite) for item in items]
        return tuple(coerced) if origin is tuple else coerced
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise _bad(key, tp, value)
    if tp is int:
        if isinstance(value, bool):
            raise _bad(key, tp, value)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip().replace("_", ""))
        except ValueError:
            raise _bad(key, tp, value) from None
    if tp is float:
        if isinstance(value, bool):
            raise _bad(key, tp, value)
        try:
            number = float(value) if isinstance(value, (int, float)) else float(str(value).strip())
        except ValueError:
            raise _bad(key, tp, value) from None
        if not math.isfinite(number) and not allow_nonfinite:
            raise InvalidInputError(f"config key {key!r} expects a finite float, got '{value}'")
        return number
    if tp is str:
        if isinstance(value, (dict, list, tuple)):
            raise _bad(key, tp, value)
        return str(value)
    if tp is Path or (isinstance(tp, type) and issubclass(tp, Path)):
        if not isinstance(value, (str, Path)) or not str(value).strip():
            raise _bad(key, tp, value)
        return Path(value).expanduser()
    raise TypeError(f"config field {key!r} has a type the config loader does not support: {tp!r}")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    return json.loads(json.dumps(value, default=str))
