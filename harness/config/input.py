"""Raw config input, checked against the schema before OmegaConf merges it.

A YAML file or a `section.key=value` override is read into plain Python first, so that each
mistake becomes one HarnessError line naming the key and the fix: unknown keys (with the
nearest real ones), wrong types, a section set to a single value, YAML that is not a mapping,
values YAML would fold across lines, unresolvable `${...}` interpolations (explained from
OmegaConf's errors). harness.config.load_config puts these together.
"""
from __future__ import annotations

import difflib
import re
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import (InterpolationKeyError, InterpolationResolutionError,
                              MissingMandatoryValue, OmegaConfBaseException)

from harness.common.errors import HarnessError
from harness.config.schema import Config

PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"
SHOW_KEYS = "`harness config` prints every key"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


# ---- the schema, as the loader checks raw input against it ----------------------------
def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in fields(Config)}  # type: ignore[misc]


def _kind(tp: Any) -> str:
    """int | float | bool | str | list, with Optional unwrapped."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        tp = args[0]
    if typing.get_origin(tp) is list or tp is list:
        return "list"
    return getattr(tp, "__name__", str(tp))


def _keys(section: type) -> dict[str, str]:
    return {name: _kind(tp) for name, tp in typing.get_type_hints(section).items()}


_EXPECTED = {"int": "a whole number", "float": "a number", "bool": "true or false",
             "str": "a string", "list": "a list, e.g. [a, b]"}


def _unknown(key: str, known: list[str], prefix: str, where: str) -> HarnessError:
    near = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    if near:
        hint = "did you mean " + " or ".join(f"{prefix}{k}" for k in near) + "?"
    else:
        hint = f"{prefix.rstrip('.') or 'the config'} has: {', '.join(known)}"
    return HarnessError(f"{where}: unknown key '{prefix}{key}': {hint} ({SHOW_KEYS})")


def check_raw(raw: Any, where: str) -> dict:
    """The raw (parsed, unmerged) mapping against the schema: unknown keys, sections given as
    single values, keys of a single value given as sections, ints for booleans. Returns it
    without empty sections (`model:` with every key commented out)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise HarnessError(f"{where}: the top level must be a mapping of sections (model:, "
                           f"train:, ...), not {_describe(raw)}")
    sections, out = _sections(), {}
    for name, body in raw.items():
        name = str(name)
        head, _, rest = name.partition(".")
        if name not in sections and head in sections and rest:
            raise HarnessError(f"{where}: '{name}' is a dotted key: in a YAML file nest it "
                               f"({head}: then {rest}: on the next line, indented), or pass "
                               f"it as an override {name}=...")
        if name not in sections:
            raise _unknown(name, list(sections), "", where)
        if body is None:
            continue
        keys = _keys(sections[name])
        if not isinstance(body, dict):
            raise HarnessError(
                f"{where}: {name} is a section, not {_describe(body)}: set its keys, e.g. "
                f"{name}.{next(iter(keys))}=... ({', '.join(keys)})")
        for key, value in body.items():
            key = str(key)
            if key not in keys:
                raise _unknown(key, list(keys), f"{name}.", where)
            kind = keys[key]
            if isinstance(value, str) and value.strip() == "???":
                raise HarnessError(f"{where}: {name}.{key}=??? is OmegaConf's marker for a "
                                   f"missing value: set {_EXPECTED[kind]}")
            if isinstance(value, dict):
                raise HarnessError(f"{where}: {name}.{key} is a single value ({_EXPECTED[kind]})"
                                   f", not a section")
            entry = _entry_type(sections[name], key)
            if kind == "list" and isinstance(value, list) and entry is not None:
                _check_entries(value, entry, f"{name}.{key}", where)
            elif kind == "list" and isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, (list, dict)):
                        raise HarnessError(f"{where}: {name}.{key}[{i}] must be a single value, "
                                           f"not a nested list or mapping")
            if kind == "bool" and isinstance(value, int) and not isinstance(value, bool) \
                    and value not in (0, 1):
                raise HarnessError(f"{where}: {name}.{key}={value} must be true or false")
            if kind == "int" and isinstance(value, float) and not isinstance(value, bool):
                whole = f": write {int(value)}" if value.is_integer() else ""
                raise HarnessError(f"{where}: {name}.{key}={value} must be a whole number"
                                   f"{whole}")
        out[name] = body
    return out


def _entry_type(section: type, key: str) -> type | None:
    """The dataclass of a list key's entries (data.mix: MixSource), or None."""
    args = typing.get_args(typing.get_type_hints(section).get(key))
    return args[0] if len(args) == 1 and is_dataclass(args[0]) else None


def _check_entries(value: list, entry: type, prefix: str, where: str) -> None:
    """A list of mappings (data.mix): each entry's keys against its dataclass."""
    keys = _keys(entry)
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise HarnessError(f"{where}: {prefix}[{i}] must be a mapping of "
                               f"{', '.join(keys)}, not {_describe(item)}")
        for key, inner in item.items():
            if str(key) not in keys:
                raise _unknown(str(key), list(keys), f"{prefix}[{i}].", where)
            kind = keys[str(key)]
            if not _fits(inner, kind):
                raise HarnessError(f"{where}: {prefix}[{i}].{key} must be {_EXPECTED[kind]}, "
                                   f"not {_describe(inner)}")


def _fits(value: Any, kind: str) -> bool:
    """A raw entry value against its field's kind (an interpolation is resolved later)."""
    if isinstance(value, str) and value.startswith("${"):
        return True
    if kind == "list":
        return isinstance(value, list) and not any(isinstance(v, (list, dict)) for v in value)
    types = {"int": int, "float": (int, float), "bool": bool, "str": str}.get(kind, object)
    return isinstance(value, types) and (kind == "bool" or not isinstance(value, bool))


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return f"the value {text[:40]}{'...' if len(text) > 40 else ''}"


def short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _lookup(raw: dict, full_key: str) -> Any:
    node: Any = raw
    for part in full_key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def explain(err: OmegaConfBaseException, where: str, raw: dict | None = None) -> HarnessError:
    """An OmegaConf error as one line naming the key and what it must be."""
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or ""
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, InterpolationKeyError):
        return HarnessError(f"{where}: {key} refers to a key that does not exist ({msg}): "
                            f"fix the ${{...}} reference or write the value itself")
    if isinstance(err, InterpolationResolutionError):
        env = re.search(r"Environment variable '([^']+)' not found", msg)
        if env:
            return HarnessError(f"{where}: {key} reads the environment variable {env[1]}, which "
                                f"is not set: export it, or give a default: "
                                f"${{oc.env:{env[1]},default}}")
        return HarnessError(f"{where}: {key}: the ${{...}} interpolation fails ({msg})")
    if isinstance(err, MissingMandatoryValue):
        return HarnessError(f"{where}: {key} has no value (???): set it")
    if "interpolation" in type(err).__name__.lower() or "Grammar" in type(err).__name__:
        return HarnessError(f"{where}: {key}: bad ${{...}} interpolation ({msg}): write "
                            f"${{section.key}} or ${{oc.env:NAME}}")
    if key and "." in key:
        section, name = key.split(".", 1)
        kind = _keys(_sections()[section]).get(name) if section in _sections() else None
        if kind:
            value = _lookup(raw or {}, key)
            got = ", not null" if value is None else f", not {short(repr(value))}"
            return HarnessError(f"{where}: {key} must be {_EXPECTED.get(kind, kind)}{got}")
    return HarnessError(f"{where}: bad value for '{key or '?'}': {msg}")


# ---- reading YAML --------------------------------------------------------------------
def resolve_source(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if not name_or_path.strip():
        raise HarnessError("--config is empty: pass a preset "
                           f"({', '.join(preset_names())}) or a YAML file")
    if path.suffix in (".yaml", ".yml") or path.exists() or "/" in name_or_path:
        if path.is_dir():
            raise HarnessError(f"--config {name_or_path} is a directory: pass a YAML file")
        if not path.exists():
            raise HarnessError(f"config file {name_or_path} not found: pass a preset "
                               f"({', '.join(preset_names())}) or an existing YAML file")
        if not path.is_file():
            raise HarnessError(f"--config {name_or_path} is not a regular file: pass a YAML file")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        near = difflib.get_close_matches(name_or_path, preset_names(), n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        raise HarnessError(f"unknown preset '{name_or_path}': {hint}choose one of "
                           f"{', '.join(preset_names())} or pass a YAML file")
    return preset


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise HarnessError(f"{path}: not a UTF-8 text file: pass a YAML config") from None
    except OSError as err:
        raise HarnessError(f"{path}: cannot read it ({err.strerror})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:  # empty, or only comments: every key at its default
            return {}
        if not isinstance(node, yaml.MappingNode):
            what = ("a list" if isinstance(node, yaml.SequenceNode)
                    else f"the value {short(repr(node.value), 40)}")
            raise HarnessError(f"{path}: the top level must be a mapping of sections (model:, "
                               f"train:, ...), not {what}")
        check_nodes(node, path)
        return OmegaConf.to_container(OmegaConf.create(text), resolve=False)
    except HarnessError:
        raise
    except RecursionError:  # PyYAML's scanner and composer recurse once per nesting level
        raise HarnessError(f"{path}: brackets or indentation nested hundreds of levels deep: a "
                           f"config is sections of keys (model: then n_layer: 12)") from None
    except (yaml.YAMLError, OmegaConfBaseException, ValueError, OSError) as err:
        first = " ".join(str(err).split())[:200]
        raise HarnessError(f"{path}: not valid YAML ({first})") from None


# values one config may expand to through YAML aliases: OmegaConf's own default limit
# (max_yaml_expanded_nodes), checked here first so that the message names the key
MAX_EXPANDED = 10_000


def _children(node: Any, where: str) -> list[tuple[str, Any, bool]]:
    """(path, child, is_key) of a composed node."""
    if isinstance(node, yaml.MappingNode):
        out = []
        for key, value in node.value:
            name = str(key.value) if isinstance(key, yaml.ScalarNode) else "?"
            out += [(where, key, True), (f"{where}.{name}" if where else name, value, False)]
        return out
    if isinstance(node, yaml.SequenceNode):
        return [(f"{where}[{i}]", value, False) for i, value in enumerate(node.value)]
    return []


def check_nodes(root: Any, path: Path | str, where: str = "") -> None:
    """The composed document, before anything expands it: each node visited once (an alias
    is its anchor's node, not a copy), so the work is the size of the text, whatever the
    aliases multiply. Refuses an alias that refers to itself, aliases that expand to more
    than MAX_EXPANDED values (an alias bomb: expanded, 11 nested levels of 9 are 9^11), and
    values YAML would fold across lines."""
    size: dict[int, int] = {}  # expanded values under each node, once it is done
    open_: set[int] = set()  # nodes whose children are being walked
    stack: list[tuple[Any, str, bool, bool]] = [(root, where, False, False)]
    while stack:
        node, where, is_key, done = stack.pop()
        kids = _children(node, where)
        if done:
            open_.discard(id(node))
            size[id(node)] = 1 + sum(size[id(child)] for _, child, _ in kids)
            if size[id(node)] > MAX_EXPANDED:
                raise HarnessError(
                    f"{path}: {where or 'the document'} holds {size[id(node)]} values (each "
                    f"YAML alias *name counted as the copy it stands for), more than the "
                    f"{MAX_EXPANDED} a config may hold: write aliased values out once")
            continue
        if id(node) in size:
            continue  # an alias of a node already checked
        if id(node) in open_:
            raise HarnessError(f"{path}: {where or 'the document'} is a YAML alias (*name) of "
                               f"a value that contains it, which never ends: write the value "
                               f"out")
        if not is_key:
            _refuse_folded(node, path, where)
        open_.add(id(node))
        stack.append((node, where, is_key, True))
        stack += [(child, w, k, False) for w, child, k in reversed(kids)]


def _refuse_folded(node: Any, path: Path | str, where: str) -> None:
    """A plain or quoted value written over several lines: YAML joins the lines with spaces,
    which for a path or a name is never what was meant. Folding on purpose (>-) is fine."""
    if isinstance(node, yaml.ScalarNode) and node.style in (None, "'", '"') \
            and node.end_mark.line > node.start_mark.line:
        raise HarnessError(
            f"{path}:{node.start_mark.line + 1}: the value of {where or 'the document'} spans "
            f"lines {node.start_mark.line + 1}-{node.end_mark.line + 1}, which YAML folds into "
            f"one line ({node.value[:60]!r}): write it on one line (or fold it on purpose "
            f"with >-)")


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def parse_override(item: str) -> dict:
    """`section.key=value` as the nested mapping it sets. The value is YAML (numbers, true,
    [a, b], null); text YAML cannot parse (`x, @x) is taken as the string it is, except an
    unclosed bracket or quote, which is a typo."""
    if "=" not in item:
        raise HarnessError(f"override '{short(item)}' is not key=value "
                           f"(e.g. train.micro_batch_size=4)")
    key, text = item.split("=", 1)
    key = key.strip()
    if not _KEY.fullmatch(key):
        raise HarnessError(f"override '{short(item)}': '{short(key)}' is not a key: write "
                           f"section.key=value, e.g. train.micro_batch_size=4 ({SHOW_KEYS})")
    if not text.isprintable():  # YAML would fold a newline into a space without a word
        raise HarnessError(f"override '{key}=...': the value {short(repr(text))} holds a "
                           f"newline, tab or control character: write {key} on one line")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):
        node = None  # OmegaConf's parse below says what is wrong, or takes it as a string
    if node is not None:
        check_nodes(node, f"override '{key}=...'", key)
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]), resolve=False)["v"]
    except RecursionError:
        raise HarnessError(f"override '{short(item)}': brackets nested hundreds of levels "
                           f"deep: write a single value or a flat list") from None
    except (yaml.YAMLError, OmegaConfBaseException, ValueError) as err:
        if text.lstrip()[:1] in ("[", "{", "'", '"'):
            first = " ".join(str(err).split())[:120]
            raise HarnessError(f"override '{short(item)}': the value is not valid YAML "
                               f"({first}): close the bracket or quote") from None
        value = text
    parts = key.split(".")
    if len(parts) > 2:
        section, name = parts[0], parts[1]
        keys = _keys(_sections()[section]) if section in _sections() else {}
        if name in keys:
            raise HarnessError(f"override '{short(item)}': {section}.{name} is a single value "
                               f"({_EXPECTED[keys[name]]}), not a section: write "
                               f"{section}.{name}=...")
    nested: Any = value
    for part in reversed(parts):
        nested = {part: nested}
    return nested
