"""Configs: frozen dataclasses whose numeric hyperparameters are pytree leaves.

A config is a `flax.struct.dataclass`. Fields that change array shapes or control flow (counts,
sizes, switches) are static: declared with `static(...)`, they live in the pytree's structure.
Every other field (learning rate, clip, gamma, lambda, KL coefficients, ...) is a leaf, so
`train(key, config)` can be `vmap`ped over configs that differ only in those values and the
whole sweep is one compiled program.

Each field carries a docstring (a string literal right below it); `field_docs` reads them for
`--help` and the README. Values come from, in increasing priority: the dataclass defaults, the
(algo, env) preset, a YAML or TOML file, and command-line overrides.
"""

import ast
import dataclasses
import inspect
import itertools
import json
import math
import textwrap
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import flax.struct
import yaml

from kl_rl.errors import ConfigError


def static(default: Any) -> Any:
    """A config field that is part of the compiled program's structure (shapes, loop counts)."""
    return flax.struct.field(pytree_node=False, default=default)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field, walking base classes."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def is_static(cls: type, name: str) -> bool:
    """Whether a field is static (shape or control flow) rather than a traced leaf."""
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    return not field.metadata.get("pytree_node", True)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def parse_value(name: str, text: Any, typ: Any) -> Any:
    """Converts `text` (a CLI string or a value read from a file) to the field's type.

    Raises:
      ConfigError: `text` is not of the type, or holds a non-finite float (inf, -inf, nan).
    """
    value = _convert(name, text, typ)
    # float() accepts inf and nan in many spellings, but no hyperparameter can take them: a run
    # with one trains to a table of nan.
    items = tuple(value.values()) if isinstance(value, dict) else value if isinstance(value, tuple) else (value,)
    if any(isinstance(v, float) and not math.isfinite(v) for v in items):
        raise ConfigError(f"{{{name}}} must be a finite number, got {text}", name)
    return value


def _convert(name: str, text: Any, typ: Any) -> Any:
    try:
        if typ is bool:
            if isinstance(text, bool):
                return text
            lowered = str(text).strip().lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(text, bool):
                raise ValueError
            value = float(text) if isinstance(text, str) else text
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                value = int(value)
            if not isinstance(value, int):
                raise ValueError
            return value
        if typ is float:
            if isinstance(text, bool):
                raise ValueError
            return float(text)
        if typ is str:
            if not isinstance(text, str):
                raise ValueError
            return text
        origin = typing.get_origin(typ)
        if origin is tuple:
            items = text
            if isinstance(text, str):
                items = [t for t in text.replace("(", "").replace(")", "").split(",") if t.strip()]
            return tuple(_convert(name, t, typing.get_args(typ)[0]) for t in items)
        if origin is dict:
            items = text
            if isinstance(text, str):
                pairs = [t.partition("=") for t in text.split(",") if t.strip()]
                if any(not sep for _, sep, _ in pairs):
                    raise ValueError
                items = {k.strip(): v for k, _, v in pairs}
            if not isinstance(items, dict):
                raise ValueError
            value_type = typing.get_args(typ)[1]
            return {str(k): _convert(f"env.{k}", v, value_type) for k, v in items.items()}
        if origin in (types.UnionType, typing.Union):
            return _convert(name, text, next(a for a in typing.get_args(typ) if a is not type(None)))
    except (ValueError, TypeError, StopIteration):
        pass
    type_name = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"{{{name}}} expects {type_name}, got {text!r}", name)


def load_file(path: str | Path) -> dict[str, Any]:
    """Reads a YAML or TOML config file into a flat dict of field values."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {str(path)!r}: {err.strerror or err}") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"config file {str(path)!r} is not valid {path.suffix[1:] or 'YAML'}: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of field names to values")
    return data


ENV_PREFIX = "env."
"""Names like "env.gravity" set one entry of a config's `env_params`."""


def build(cls: type, values: dict[str, Any]) -> Any:
    """Makes a `cls` config from a dict of raw values (strings or parsed), checking every name."""
    types_ = _field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    env_params: dict[str, Any] = {}
    for raw_name, raw in values.items():
        name = str(raw_name).replace("-", "_")
        if name.startswith(ENV_PREFIX) and "env_params" in known:
            # --env.NAME VALUE: one env param (its name keeps its spelling: Brax paths have dots).
            param = str(raw_name)[len(ENV_PREFIX) :]
            env_params[param] = parse_value(f"env.{param}", raw, float)
            continue
        if name not in known:
            close = [k for k in sorted(known) if k.split("_")[0] in name or name.split("_")[0] in k]
            hint = f"; did you mean {', '.join('{' + c + '}' for c in close[:3])}?" if close else ""
            raise ConfigError(
                f"unknown hyperparameter {raw_name!r} for {cls.__name__}{hint} (see kl-rl train --algo ... --help)",
                *close[:3],
            )
        kwargs[name] = parse_value(name, raw, types_[name])
    if env_params:
        kwargs["env_params"] = {**kwargs.get("env_params", {}), **env_params}
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of the config's fields."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if hasattr(value, "tolist"):
            value = value.tolist()
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, dict):
            value = {k: v.tolist() if hasattr(v, "tolist") else v for k, v in value.items()}
        out[f.name] = value
    return out
