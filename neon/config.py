"""Recipes: YAML files → frozen dataclasses, with dotted command-line overrides.

A recipe has the top-level sections `family` (a registry name), `model`, `sampler`, `synthetic`,
`finetune` and `sweep`. Each section is a frozen dataclass owned by the module that uses it
(`SyntheticConfig` in `neon.synthetic`, ...); the sampler section is the family's own `Sampler`
dataclass. Values are type-checked against the field annotations, as nanoGPT's configurator does;
unknown keys are errors. `--section.field VALUE` flags override single fields (litgpt style).
"""

import dataclasses
import math
import re
import types
import typing

import yaml

from neon.errors import NeonError


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 numbers: '1e-5' is a float and '0:2:0.25' stays a string (YAML 1.1
    reads it as the base-60 number 60.25)."""


_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def parse_yaml(text: str):
    """YAML text (a file or one command-line value) with the project's loader."""
    return yaml.load(text, Loader=_Loader)


def load_yaml(path: str) -> dict:
    """The recipe at `path` as a plain dict (empty file → {})."""
    try:
        with open(path) as f:
            data = parse_yaml(f)
    except FileNotFoundError:
        raise NeonError(f"no such config file: {path}") from None
    except yaml.YAMLError as e:
        raise NeonError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise NeonError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    return data


def set_dotted(raw: dict, key: str, value, parse: bool = True) -> None:
    """Set `raw['a']['b'] = value` for key 'a.b', creating sections as needed. With parse=True a
    string value from the command line is read as YAML ('1e-5' → 1e-05, 'true' → True, '[1, 2]' →
    a list, '0:2:0.25' → itself)."""
    if parse and isinstance(value, str) and value.strip():
        try:
            value = parse_yaml(value)
        except yaml.YAMLError:
            pass
    *sections, field = key.split(".")
    node = raw
    for name in sections:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise NeonError(f"cannot set {key}: {name} is not a section")
        node = child
    node[field] = value


def build(cls, data: dict | None, where: str):
    """Instantiate dataclass `cls` from `data`, checking every value against its annotation.
    `where` names the section in error messages."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise NeonError(f"unknown key {where}.{unknown[0]} (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name in data:
        values[name] = _coerce(data[name], hints[name], f"{where}.{name}")
        _check_finite(values[name], fields[name], f"{where}.{name}")
    return cls(**values)


def _check_finite(value, field: dataclasses.Field, where: str) -> None:
    """Refuse NaN in any float of a recipe value, and ±inf unless the field's default is infinite
    (an "unbounded" setting such as EDM's S_max)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if isinstance(item, float) and not math.isfinite(item):
            default = field.default
            if math.isinf(item) and isinstance(default, float) and math.isinf(default):
                continue
            raise NeonError(f"{where}: must be finite, got {item}")


def to_dict(obj) -> dict:
    """A dataclass (or a dict of them) as plain, YAML-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def dump_yaml(data: dict) -> str:
    return yaml.safe_dump(to_dict(data), sort_keys=False)


def _coerce(value, hint, where: str):
    """Return `value` as type `hint`, or raise NeonError naming `where`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except NeonError:
                pass
        raise NeonError(f"{where}: expected {_name(hint)}, got {value!r}")
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (typing.Any,)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise NeonError(f"{where}: expected a list, got {value!r}")
        return origin(_coerce(v, item, where) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise NeonError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is typing.Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint in (int, float):
        number = value
        if isinstance(value, str):  # a CLI flag typed as text, e.g. '1e6'
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            if hint is float:
                return float(number)
            if float(number).is_integer():
                return int(number)
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif isinstance(value, hint):
        return value
    raise NeonError(f"{where}: expected {_name(hint)}, got {value!r}")


def _name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
