"""The one config loader: typed dataclasses from TOML, `--section.key value` overrides, TOML out.

Training, post-training and the data pipeline describe their files as trees of dataclasses; this
module reads a TOML-shaped dict into such a tree (`build`), checks every value against the
field's type hint, parses command-line overrides to the same types, writes a tree back as TOML
that reads back equal (`to_toml`) and lists every section and key for `--help`
(`describe_sections`). It sits at the bottom beside `herd.io` and imports nothing from herd, so
every package may use it: one loader, so every command reports unknown keys and wrong types with
the same messages, naming the full key path (`optim.lrr`, `stages.pretrain.steps`,
`step[3].min_words`).

Design trade-off: the schema is the dataclasses themselves (their type hints drive parsing and
validation), instead of a schema library. That keeps configs readable as plain Python and costs a
small hand-written coercer that understands exactly the types used in herd: int, float, str, bool,
Literal, `X | None`, unions of those, lists, string-keyed tables (`dict[str, X]`) and `Any`.

Two shapes beyond plain sections:
- a list of dataclasses (`[[stages]]`) is a list of tables built from one class;
- a *tagged* list (`[[step]]`, declared with `tagged_entries(registry, ...)`) picks each entry's
  class from a registry by its `type` key, so each entry has its own keys; an entry's `name`
  defaults to its type. Fields typed as a callable are set from Python only and are not keys.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")

TAG = "type"  # the key that picks an entry's class in a tagged list


# ---- schema helpers ----------------------------------------------------------------------------


def tagged_entries(registry: dict[str, type], *, what: str,
                   exclude: Callable[[type], dict[str, str]] | None = None) -> Any:
    """A dataclass field holding a list of tables whose class is chosen by their `type` key.

    `what` names the list in messages (e.g. "[[step]]"); `exclude(cls)` returns keys that `cls`
    does not take despite having the field, each with the reason shown when it is given anyway.
    """
    return field(default_factory=list, metadata={"registry": registry, "what": what, "exclude": exclude})


def keys_of(cls: type) -> dict[str, Any]:
    """The config keys of a dataclass and their types: init fields, less Python-only callables."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)
            if f.init and not _is_callable(hints[f.name])}


def _is_callable(tp: Any) -> bool:
    return typing.get_origin(_strip_optional(tp)) is typing.get_origin(Callable[[], None])


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _list_item(tp: Any) -> Any:
    """The item class of `list[SomeDataclass]`, else None."""
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if dataclasses.is_dataclass(item):
            return item
    return None


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
        if len(args) < len(typing.get_args(tp)):
            return typing.Union[tuple(args)]
    return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


# ---- reading -----------------------------------------------------------------------------------


def read_toml(path: str | Path | None, *, what: str = "config file",
              hint: str = "presets live in configs/*.toml") -> dict[str, Any]:
    """The TOML file at `path` as a dict ({} for None: every default)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found" + (f" ({hint})" if hint else ""))
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None


def build(cls: type[T], data: Any, prefix: str = "", *, title: str | None = None,
          exclude: dict[str, str] | None = None) -> T:
    """A dataclass tree from a TOML-shaped dict; unknown keys, missing required keys and wrong types
    are ValueErrors naming the key path. `title` names the table in messages (default `[prefix]`);
    `exclude` maps keys this table must not take to the reason why."""
    where = title or (f"[{prefix}]" if prefix else "the top level")
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'}: expected a table, got {type(data).__name__}")
    dotted = f"{prefix}." if prefix else ""
    for name, reason in (exclude or {}).items():
        if name in data:
            raise ValueError(f"{dotted}{name}: {reason}")
    hints = {k: v for k, v in keys_of(cls).items() if k not in (exclude or {})}
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ValueError(f"unknown key {dotted}{unknown[0]} in {where}; valid keys: {', '.join(hints)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, tp in hints.items():
        key = f"{dotted}{name}"
        if name not in data:
            if not _required(fields[name]):
                continue
            if dataclasses.is_dataclass(tp):  # a section without a default: its own required keys say what is missing
                kwargs[name] = build(tp, {}, key)
                continue
            help_ = fields[name].metadata.get("help")
            raise ValueError(f"missing required key {key} in {where}" + (f": {help_}" if help_ else ""))
        value = data[name]
        meta = fields[name].metadata
        if meta.get("registry") is not None:
            if not isinstance(value, list):
                raise ValueError(f"{key}: expected a list of tables ({meta['what']}), got {type(value).__name__}")
            kwargs[name] = [build_tagged(meta["registry"], v, f"{key}[{i}]", what=meta["what"],
                                         exclude=meta["exclude"]) for i, v in enumerate(value)]
        elif dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, value, key)
        elif (item := _list_item(tp)) is not None:
            if not isinstance(value, list):
                raise ValueError(f"{key}: expected a list of tables ([[{key}]]), got {type(value).__name__}")
            kwargs[name] = [build(item, v, f"{key}.{v.get('name', i) if isinstance(v, dict) else i}")
                            for i, v in enumerate(value)]
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def build_tagged(registry: dict[str, type], entry: Any, key: str, *, what: str,
                 exclude: Callable[[type], dict[str, str]] | None = None) -> Any:
    """One entry of a tagged list: the class its `type` names, built from the other keys."""
    if not isinstance(entry, dict):
        raise ValueError(f"{key}: expected a table ({what}), got {type(entry).__name__}")
    entry = dict(entry)
    kind = entry.pop(TAG, None)
    if kind not in registry:
        raise ValueError(f"{key}: unknown or missing type {kind!r} in {what}; choose one of "
                         f"{', '.join(sorted(registry))}")
    cls = registry[kind]
    if "name" in keys_of(cls):
        entry.setdefault("name", kind)
    return build(cls, entry, key, title=f'{what} of type "{kind}"', exclude=exclude(cls) if exclude else None)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    if tp is Any:
        return value
    base = _strip_optional(tp)
    if value is None:
        if base is tp:
            raise ValueError(f"{key}: a value is required")
        return None
    if _is_union(base):  # e.g. str | list[str]: the first member the value fits
        for member in typing.get_args(base):
            try:
                return _coerce(value, member, key)
            except ValueError:
                pass
        raise ValueError(f"{key}: expected {_type_name(base)}, got {value!r}")
    origin = typing.get_origin(base)
    if origin is Literal:
        choices = typing.get_args(base)
        if value not in choices:
            raise ValueError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(base)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if base is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a table (e.g. {{key = 1}}), got {value!r}")
        item = typing.get_args(base)[1] if typing.get_args(base) else Any
        return {k: _coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    if base is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"config field {key} has an unsupported type {tp}")  # a schema bug, not user input


# ---- overrides ---------------------------------------------------------------------------------


def parse_overrides(argv: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """["--optim.lr", "3e-4", "--job.seed=2"] -> [("optim.lr", "3e-4"), ("job.seed", "2")]."""
    out, i = [], 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg:
            raise ValueError(f"expected an override --section.key VALUE, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ValueError(f"override {arg} has no value")
            key, value = arg[2:], argv[i + 1]
            i += 2
        out.append((key, value))
    return out


def set_field(target: Any, name: str, text: str, key: str) -> None:
    """Set the dataclass field `name` of `target` from command-line `text` (override `--key`)."""
    hints = keys_of(type(target))
    if name not in hints:
        raise ValueError(f"--{key}: unknown key {name!r}; valid keys: {', '.join(hints)}")
    setattr(target, name, _coerce(parse_text(text, hints[name]), hints[name], key))


def parse_text(text: str, tp: Any) -> Any:
    """Command-line text -> a Python value, using TOML syntax where it is unambiguous."""
    base = _strip_optional(tp)
    if base is str or typing.get_origin(base) is Literal:
        return text
    if text.lower() in ("none", "null") and base is not tp:
        return None
    if typing.get_origin(base) is list and not text.lstrip().startswith("["):
        return [x.strip() for x in text.split(",") if x.strip()]  # --data.train a,b
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # _coerce reports it as the wrong type
    if _is_union(base) and str in typing.get_args(base) and not isinstance(value, (list, dict)):
        return text  # str | list[str]: "[a, b]" is the list, anything else the string as typed
    return value


def override_data(cls: type, data: dict[str, Any], key: str, text: str) -> None:
    """Apply one `--key value` override to the TOML-shaped `data` of a `cls` tree, in place, before
    `build`: the value is parsed to the declared type of its field, so the dict stays the record of
    what was asked for (the data pipeline keeps it as its run's identity).

    `key` is `section.key`, or `list.ENTRY.key` where ENTRY is an entry's name (a tagged entry's
    name defaults to its type) or its index. Entries cannot be added, removed or retyped from the
    command line: edit the file for that."""
    parts = key.split(".")
    where, target, i = cls, data, 0
    excluded: dict[str, str] = {}  # keys the current entry's class does not take, with the reason
    while True:
        name = parts[i]
        hints = {k: v for k, v in keys_of(where).items() if k not in excluded}
        path = ".".join(parts[: i + 1])
        if name in excluded:
            raise ValueError(f"--{key}: {excluded[name]}")
        if name not in hints:
            if i == 0:
                raise ValueError(f"--{key}: unknown section {name!r}; valid sections: {', '.join(hints)}")
            if name == TAG:
                raise ValueError(f"--{key}: an entry's type cannot be overridden; edit the file")
            raise ValueError(f"--{key}: unknown key {name!r}; valid keys: {', '.join(hints)}")
        tp = hints[name]
        meta = next(f for f in dataclasses.fields(where) if f.name == name).metadata
        registry = meta.get("registry")
        item = _list_item(tp)
        if dataclasses.is_dataclass(tp):
            if i + 1 == len(parts):
                raise ValueError(f"--{key} is a section; override one of its keys: --{key}.KEY VALUE")
            sub = target.setdefault(name, {})
            if not isinstance(sub, dict):
                raise ValueError(f"--{key}: {path} in the file is not a table")
            where, target, i, excluded = tp, sub, i + 1, {}
            continue
        if registry is not None or item is not None:
            if i + 3 != len(parts):
                raise ValueError(f"--{key}: a list entry's key is overridden as --{path}.NAME.KEY (or "
                                 f"--{path}.INDEX.KEY); whole entries cannot be added or replaced from the "
                                 "command line: edit the file")
            entries = target.get(name, [])
            if not isinstance(entries, list):
                raise ValueError(f"--{key}: {path} in the file is not a list of tables")
            names = [e.get("name", e.get(TAG) if registry is not None else None) if isinstance(e, dict) else None
                     for e in entries]
            sel = parts[i + 1]
            if sel in names:
                index = names.index(sel)
            elif sel.isdigit() and int(sel) < len(entries):
                index = int(sel)
            else:
                shown = ", ".join(repr(n) for n in names if n is not None)
                raise ValueError(f"--{key}: no entry {sel!r} in {path}; entries are {shown or 'none'} "
                                 f"(or an index 0..{len(entries) - 1})" if entries else
                                 f"--{key}: the file has no {path} entries to override")
            entry = entries[index]
            if not isinstance(entry, dict):
                raise ValueError(f"--{key}: {path}[{index}] in the file is not a table")
            if registry is not None:
                if entry.get(TAG) not in registry:
                    raise ValueError(f"--{key}: {path}[{index}] has an unknown or missing type {entry.get(TAG)!r}; "
                                     f"choose one of {', '.join(sorted(registry))}")
                where = registry[entry[TAG]]
                excluded = meta["exclude"](where) if meta["exclude"] else {}
            else:
                where, excluded = item, {}
            target, i = entry, i + 2
            continue
        if i + 1 != len(parts):
            raise ValueError(f"--{key}: {path} is a value, not a section")
        value = _coerce(parse_text(text, tp), tp, f"--{key}")
        if value is None:  # TOML has no null: "none" can only mean "leave it unset", where unset is None
            f = next(f for f in dataclasses.fields(where) if f.name == name)
            if f.default is not None:
                raise ValueError(f"--{key}: cannot be unset from the command line (a file cannot say none "
                                 "either); give a value")
            target.pop(name, None)
        else:
            target[name] = value
        return


def apply_overrides(cls: type, data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A deep copy of `data` with every `--key value` of `overrides` applied (see override_data)."""
    data = copy.deepcopy(data)
    for key, text in parse_overrides(list(overrides)):
        override_data(cls, data, key, text)
    return data


# ---- writing -----------------------------------------------------------------------------------


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The TOML-shaped dict of a config tree (None fields dropped, since TOML has no null; tagged
    entries get their `type` key back)."""
    return _plain(cfg)


def _plain(x: Any, tag: str | None = None) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        out: dict[str, Any] = {TAG: tag} if tag is not None else {}
        fields = {f.name: f for f in dataclasses.fields(x)}
        for name in keys_of(type(x)):
            value = getattr(x, name)
            f = fields[name]
            empty_tables = value == [] and f.default_factory is list and _is_table_list(f, keys_of(type(x))[name])
            if value is None or empty_tables:
                continue  # no null in TOML; an empty list of tables reads back from its absence
            registry = f.metadata.get("registry")
            if registry is not None:
                names = {c: k for k, c in registry.items()}
                out[name] = [_plain(e, names.get(type(e), getattr(e, TAG, None))) for e in value]
            else:
                out[name] = _plain(value)
        return out
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items() if v is not None}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _is_table_list(f: dataclasses.Field, tp: Any) -> bool:
    return f.metadata.get("registry") is not None or _list_item(tp) is not None


def to_toml(cfg: Any) -> str:
    """Serialise a config tree as TOML that `build` reads back to an equal tree: sections as
    [name], lists of sections as [[name]] (stdlib has a TOML reader only; the value types are few)."""
    out: list[str] = []
    tables: list[tuple[str, dict]] = []
    for key, value in config_to_dict(cfg).items():
        if isinstance(value, dict):
            tables.append((f"[{_toml_key(key)}]", value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables += [(f"[[{_toml_key(key)}]]", v) for v in value]
        else:
            out.append(f"{_toml_key(key)} = {toml_value(value)}")
    for header, values in tables:
        if out:
            out.append("")
        out.append(header)
        out += [f"{_toml_key(k)} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(out) + "\n"


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else toml_value(k)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        escaped = v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return '"' + re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\u{ord(m.group()):04x}", escaped) + '"'
    if isinstance(v, float):
        return repr(v)  # TOML spells the specials as Python does: nan, inf, -inf
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table (e.g. model.rope_scaling, a step's `where`)
        return "{" + ", ".join(f"{_toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    return str(v)


# ---- help --------------------------------------------------------------------------------------


def describe_sections(cls: type) -> str:
    """Every section and key of a config class with its default and type: the text for `--help`.

    A key whose default is None shows "unset" (TOML has no null: leave the key out to keep the
    default), one without a default "required"; a tagged list shows each type's keys.
    """
    lines: list[str] = []
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, tp in keys_of(cls).items():
        meta = fields[name].metadata
        if meta.get("registry") is not None:
            lines.append(f"[[{name}]]  one table per entry; `type` picks its keys (name defaults to the type):")
            exclude = meta["exclude"]
            for kind, entry_cls in sorted(meta["registry"].items()):
                keys = [k for k in keys_of(entry_cls) if k not in (exclude(entry_cls) if exclude else {})]
                lines.append(f"  type = \"{kind}\": {', '.join(keys)}")
            continue
        item = _list_item(tp)
        section = item or (tp if dataclasses.is_dataclass(tp) else None)
        if section is None:
            continue
        lines.append(f"[[{name}]]" if item else f"[{name}]")
        types_ = keys_of(section)
        for g in dataclasses.fields(section):
            if g.name not in types_:
                continue
            if _required(g):
                shown = "required"
            else:
                value = g.default if g.default is not dataclasses.MISSING else g.default_factory()
                shown = "unset" if value is None else toml_value(config_to_dict(value) if
                                                               dataclasses.is_dataclass(value) else value)
            lines.append(f"  {g.name} = {shown}  ({_type_name(types_[g.name])})")
    return "\n".join(lines)


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "any value"
    base = _strip_optional(tp)
    if _is_union(base):
        return " or ".join(_type_name(a) for a in typing.get_args(base))
    origin = typing.get_origin(base)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(base)))
    if origin is list:
        return f"list of {_type_name(typing.get_args(base)[0])}"
    if base is dict or origin is dict:
        args = typing.get_args(base)
        return f"table of {_type_name(args[1])}" if args and args[1] is not Any else "table"
    return getattr(base, "__name__", str(base))
