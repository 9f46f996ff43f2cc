"""Config files: YAML validated into frozen dataclasses, one home for every command's configuration.

* Unknown keys and wrong types are rejected with a message naming the key and the allowed keys or values.
* Any key can be overridden from the command line as ``dotted.key=value`` (the value is parsed as YAML).
* A config may start with ``_base_: other.yaml`` (relative to itself); the file's keys override the base's.
* The resolved config (defaults filled in, overrides applied) is saved beside what it made as ``config.yaml``.

Sections are plain dataclasses; ``Literal`` fields list their allowed values, a ``RANGES`` class attribute the
numeric bounds. Each command defines its root dataclass (a training run's is :class:`gkd.kd.config.RunConfig`) and
passes it to :func:`load_config`.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from gkd.core.errors import GkdError

__all__ = ["load_config", "from_dict", "to_dict", "config_differences", "merge_dicts", "apply_overrides",
           "parse_override_value", "flatten_overrides", "dump_config", "check_run_name", "parse_yaml"]

_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")




def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin in (tuple, list):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form or raise GkdError."""
    origin = typing.get_origin(tp)
    bad = GkdError(f"{source}: '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, str):
            for a in allowed:
                if isinstance(a, str) and a.lower() == value.lower():
                    return a
        if value in allowed:
            return value
        raise bad
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, source)
            except GkdError:
                continue
        raise bad
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise bad
        (elem,) = typing.get_args(tp)[:1]
        return tuple(_coerce(v, elem, f"{key}[{i}]", source) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise GkdError(f"{source}: '{key}' must be a mapping of {sorted(f.name for f in dataclasses.fields(tp))}, "
                           f"got {value!r}")
        return from_dict(tp, value, source, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):  # YAML 1.1 reads 1e-4 as text
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise GkdError(f"{source}: '{key}' must be a mapping of keys (e.g. {key}.train.epochs=2), got {value!r}")
    if tp is Any:
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def from_dict(cls: type, data: dict, source: str = "config", prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types.

    Args:
        cls: a dataclass type whose fields are annotated with supported types.
        data: the mapping to validate.
        source: the file (or "command line") named in error messages.
        prefix: dotted key prefix for error messages.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), list(fields), n=1, cutoff=0.6)
        hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
        raise GkdError(f"{source}: unknown key '{prefix}{unknown[0]}'; {hint}allowed keys here: {', '.join(fields)}")
    kwargs = {name: _coerce(data[name], hints[name], prefix + name, source) for name in fields if name in data}
    for name, rules in getattr(cls, "RANGES", {}).items():
        _check_range(kwargs.get(name, fields[name].default), rules, prefix + name, source)
    if "name" in fields and "runs_dir" in fields and "name" in kwargs:  # a run folder: runs_dir/name
        check_run_name(kwargs["name"], prefix + "name", source)
    return cls(**kwargs)


def check_run_name(name: str, key: str = "name", source: str = "config") -> None:
    """A run's ``name`` is one folder inside ``runs_dir``: an empty name would make ``runs_dir`` itself the run
    folder (and a run there could replace what the user keeps beside it), and ``..`` or a ``/`` would write
    outside it."""
    bad = (not name.strip() or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
           or name != name.strip())
    if bad:
        raise GkdError(f"{source}: '{key}' must be one folder name inside runs_dir (not empty, no '/' or '\\', "
                       f"not '.' or '..', no leading or trailing spaces), got {name!r}")


_OPS = {">": lambda v, b: v > b, ">=": lambda v, b: v >= b, "<": lambda v, b: v < b, "<=": lambda v, b: v <= b}


def _check_range(value: Any, rules: tuple[tuple[str, float], ...], key: str, source: str) -> None:
    """``rules`` like ``((">", 0),)``, checked on a number or on each element of a list. None (an optional key
    left unset) passes, and so does NaN: training's non-finite-loss check names the loss term and the step."""
    if value is None or isinstance(value, bool):
        return
    for v in (value if isinstance(value, tuple) else (value,)):
        if v == v and not all(_OPS[op](v, bound) for op, bound in rules):
            want = " and ".join(f"{op} {bound:g}" for op, bound in rules)
            raise GkdError(f"{source}: '{key}' must be {want}, got {v!r}")


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict (tuples become lists) for YAML/JSON/checkpoints."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def config_differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every leaf where two plain config dicts differ, sorted by key.

    Used to refuse resuming or reusing a run made with another config (gkd.kd.resume)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append((prefix + k, a, b))
    return out


def merge_dicts(base: dict, over: dict) -> dict:
    """``over`` merged into a deep copy of ``base``: nested mappings merge key by key, anything else replaces.

    Neither argument is modified, nor shares a mapping with the result (overrides applied to the result later must
    not reach back into a caller's defaults)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = Path(path)
    if path in seen:
        raise GkdError(f"{path}: _base_ chain loops back to itself")
    # the file that names this one as its _base_: a copied config whose base stayed behind is fixed there
    referrer = f" (the _base_ of {seen[-1]})" if seen else ""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        hint = "; fix _base_ there (a relative _base_ is read from that file's folder)" if seen else ""
        raise GkdError(f"{path}: config file not found{referrer}{hint}") from None
    except IsADirectoryError:
        raise GkdError(f"{path}: a folder, not a config file{referrer}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GkdError(f"{path}: cannot read config{referrer} ({exc})") from None
    data = parse_yaml(text, path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise GkdError(f"{path}: a config must be a mapping of keys, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is not None:
        if not isinstance(base, str) or not base.strip():
            raise GkdError(f"{path}: '_base_' must be the path of another config file, got {base!r}")
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        data = merge_dicts(_read_yaml(base_path, seen + (path,)), data)
    return data


def parse_yaml(text: str, path: str | Path) -> Any:
    """YAML text read from ``path``; invalid YAML is a one-line ``GkdError`` naming the file, the line and why."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise GkdError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None


_NULLS = ("null", "Null", "NULL", "~")


def parse_override_value(raw: str) -> Any:
    """A command-line value: YAML (``2``, ``0.01``, ``null``, ``[8, 11]``, ``{a: 1}``), except where YAML would
    silently turn text into something else: ``#ckpt/t.pt`` (a comment: null) and ``data/a: b`` (a mapping)
    stay the text typed, and so does ``a #b`` (YAML would drop `` #b``). Sections are set with dotted keys, so an
    unbraced ``k: v`` is never meant as a mapping."""
    import yaml

    if not raw.strip():
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if value is None and raw.strip() not in _NULLS:
        return raw
    if "#" in raw and isinstance(value, str) and "#" not in value:  # 'name=a #b': YAML drops " #b" as a comment
        return raw
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):
        return raw
    return value


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``a.b.c=value`` overrides (values read by :func:`parse_override_value`)."""
    data = merge_dicts({}, data)
    for item in overrides:
        if "=" not in item:
            raise GkdError(f"command line: override '{item}' must look like key=value, e.g. train.epochs=2")
        key, raw = item.split("=", 1)
        key = key.strip()
        value = parse_override_value(raw)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise GkdError(f"command line: '{key}': '{part}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def flatten_overrides(d: Any, prefix: str = "") -> list[str]:
    """A nested mapping -> ``["a.b=value", ...]`` overrides (values dumped as flow-style YAML)."""
    import yaml

    if not isinstance(d, dict):
        text = yaml.safe_dump(d, default_flow_style=True).strip()
        return [f"{prefix}={text.removesuffix('...').strip()}"]
    out: list[str] = []
    for k, v in d.items():
        out += flatten_overrides(v, f"{prefix}.{k}" if prefix else k)
    return out


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *, cls: type,
                updates: dict | None = None, key_prefix: str = "") -> Any:
    """Read a YAML config (or start from defaults when ``path`` is None), apply updates and overrides, validate.

    Args:
        path: the YAML file, or None for the defaults of ``cls``.
        overrides: command-line ``dotted.key=value`` strings (values parsed as YAML), applied last.
        cls: the root dataclass.
        updates: a nested mapping merged over the file as data, before ``overrides``: what a program passes
            (values are never re-parsed, so ``#``, ``: `` or quotes in them stay as they are).
        key_prefix: prefix of every key in error messages (``gkd run`` names ``teacher.train.epochs``).

    Raises:
        GkdError: unknown key, wrong type or value, unreadable or invalid YAML.
    """
    data = _read_yaml(Path(path)) if path is not None else {}
    source = str(path) if path is not None else "config"
    if updates:
        data = merge_dicts(data, updates)
    if overrides:
        data = apply_overrides(data, overrides)
    if updates or overrides:
        source = f"{source} (with overrides)"
    return from_dict(cls, data, source, prefix=key_prefix)


def dump_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically."""
    import yaml

    from gkd.core.io import atomic_write_text

    return atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
