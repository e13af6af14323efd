"""Dataclass configs with a CLI generated from them.

One `@dataclass` per script is the single source of truth: every field becomes a kebab-case
flag whose help is the field's `help` metadata, a `--config FILE` (YAML or JSON) can set the
same fields (flags given on the command line win), and the resolved config is written into
the run directory so a run can be reproduced from its folder alone.

Validation lives in each config's `__post_init__` and raises `InputError` naming the flag, so
a bad value stops the run before any compute; `parse_config` turns it into argparse's exit 2.
A plain `ValueError` there is a bug and keeps its traceback. What holds for every field of a
type is checked here, once, for every script: a choice is one of its `Literal`'s values, and a
float is finite (nan and inf are refused as they enter, from a flag or a config file, unless
the field says `option(..., finite=False)`), so a kind added later gets both for free.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from ddp_utils.errors import InputError, flag_name
from ddp_utils.files import write_text

C = TypeVar("C")


def option(
    default: Any,
    help: str,
    aliases: typing.Sequence[str] = (),
    positional: bool = False,
    section: str | None = None,
    finite: bool = True,
) -> Any:
    """A dataclass field carrying its CLI help (and alias flags). Choices come from the
    field's `Literal[...]` type. `section` titles the group `--help` lists it in (a model
    kind's own options: "DDPM objective", "EDM objective", ...). `finite` False: a float
    field that means something by inf or nan (none does so far); every other float field
    refuses them."""
    metadata: dict[str, Any] = {
        "help": help,
        "aliases": tuple(aliases),
        "positional": positional,
        "section": section,
        "finite": finite,
    }
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def require(condition: bool, message: str) -> None:
    """Validation in a config's `__post_init__`: an InputError; the message names the flag."""
    if not condition:
        raise InputError(message)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _choices(tp: Any) -> tuple[Any, ...] | None:
    """The allowed values of a `Literal[...]` (optionally `| None`) type, else None."""
    base, _ = _unwrap_optional(tp)
    return typing.get_args(base) if typing.get_origin(base) is Literal else None


def _parse_scalar(tp: Any, optional: bool) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null", ""):
            return None
        if typing.get_origin(tp) is Literal:
            return text  # argparse checks the choices
        if tp is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        return tp(text)

    parse.__name__ = getattr(tp, "__name__", "value")
    return parse


_NONE_WORDS = ("none", "null", "")  # what an optional field's flag takes for "not set"


def _coerce(name: str, tp: Any, value: Any, finite: bool = True) -> Any:
    """Coerce a value read from a config file to the field's type, or raise an InputError.
    `finite`: a float must be a finite number (the field's `option(finite=...)`)."""
    base, optional = _unwrap_optional(tp)
    if optional and isinstance(value, str) and value.strip().lower() in _NONE_WORDS:
        value = None  # `max_grad_norm: none` in a file means what `--max-grad-norm none` does
    if value is None:
        if optional:
            return None
        raise InputError(f"{flag_name(name)}: null is not allowed")
    if typing.get_origin(base) in (list, tuple):
        (item_type, *_) = typing.get_args(base) or (str,)
        if not isinstance(value, list | tuple):
            raise InputError(f"{flag_name(name)}: expected a list, got {value!r}")
        return [_coerce(name, item_type, v, finite) for v in value]
    choices = _choices(base)
    if choices is not None:
        if value not in choices:
            raise InputError(
                f"{flag_name(name)} must be one of {', '.join(map(str, choices))}, got {value!r}"
            )
        return value
    if base is bool and not isinstance(value, bool):
        raise InputError(f"{flag_name(name)}: expected true or false, got {value!r}")
    if base in (int, float) and isinstance(value, bool):  # YAML's `yes` is not a number
        raise InputError(f"{flag_name(name)}: expected {base.__name__}, got {value!r}")
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if base is int and isinstance(value, float):
        if not value.is_integer():  # 3.7 -> 3 would be a silent change of the user's value
            raise InputError(f"{flag_name(name)}: expected a whole number, got {value!r}")
        return int(value)
    if base in (int, float, str) and not isinstance(value, base):
        try:
            value = base(value)
        except (TypeError, ValueError):
            raise InputError(
                f"{flag_name(name)}: expected {base.__name__}, got {value!r}"
            ) from None
    if base is float and finite:
        check_finite(name, value)
    return value


def check_finite(name: str, value: float) -> None:
    """nan or inf in a float field: refused where it enters, naming the flag (never trained on
    and later reported as a diverged run)."""
    if not math.isfinite(value):
        raise InputError(f"{flag_name(name)} must be a finite number, got {value}")


@dataclass(frozen=True)
class ForeignFlag:
    """A flag of another tool's scripts (diffusers' training examples) and what it is here.

    `field` set: an alias of that field's flag (`values` translates the other tool's values,
    `note` is printed where the meaning differs); `field` None: refused, `note` says what to use
    instead (or, with `ignored`, the flag is dropped with the note).
    """

    field: str | None
    note: str = ""
    values: Mapping[str, str] | None = None
    ignored: bool = False


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks: each script's example commands stay one per line."""


_SAYS_DEFAULT = re.compile(r"\bdefault( with [^:]*)?:")


def _help_text(text: str, default: Any) -> str:
    """A field's help with its default, `%` escaped (argparse %-formats every help string)."""
    if not _SAYS_DEFAULT.search(text):  # some helps say their default in words already
        text += f" (default: {default})"
    return text.replace("%", "%%")


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=HelpFormatter,
        allow_abbrev=False,  # `--max-step` is a typo to report, not `--max-steps`
    )
    parser.add_argument("--config", type=Path, help="YAML or JSON file setting any of the fields")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    hints = typing.get_type_hints(cls)
    sections: dict[str, argparse._ArgumentGroup] = {}
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        title = field.metadata.get("section")
        group = parser if title is None else sections.get(title)
        if group is None:
            group = sections[title] = parser.add_argument_group(title)
        tp, optional = _unwrap_optional(hints[field.name])
        default = (
            field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        )
        kwargs: dict[str, Any] = {
            "dest": field.name,
            "default": argparse.SUPPRESS,
            "help": _help_text(field.metadata.get("help", ""), default),
        }
        choices = _choices(hints[field.name])
        if choices is not None:
            kwargs["choices"] = choices
        if field.metadata.get("positional"):
            parser.add_argument(
                field.name,
                nargs="?",
                type=_parse_scalar(tp, optional),
                **{k: v for k, v in kwargs.items() if k != "dest"},
            )
            continue
        flags = [flag_name(field.name), *field.metadata.get("aliases", ())]
        if tp is bool:
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(tp) in (list, tuple):
            (item_type, *_) = typing.get_args(tp) or (str,)
            # Several values, and the flag repeated: --prompt a b --prompt c gives [a, b, c].
            group.add_argument(
                *flags, nargs="+", action="extend", type=_parse_scalar(item_type, False), **kwargs
            )
        else:
            group.add_argument(*flags, type=_parse_scalar(tp, optional), **kwargs)
    return parser


class DuplicateKeyError(ValueError):
    """A key given twice in one mapping of a config file (YAML and JSON would keep the last)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged on purpose
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise DuplicateKeyError(
                    f"{key!r} is given twice (line {key_node.start_mark.line + 1})"
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: a JSON object with a key given twice is refused."""
    keys = [key for key, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise DuplicateKeyError(f"{key!r} is given twice")
    return dict(pairs)


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"--config: file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text, object_pairs_hook=_unique_pairs)
        else:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except DuplicateKeyError as err:
        raise InputError(f"--config: {path}: {err}; keep one") from None
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise InputError(f"--config: {path} does not parse: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"--config: {path} must hold a mapping of field names to values")
    # Accept both `batch_size` and `batch-size` spellings (but not both at once).
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in values:
            raise InputError(f"--config: {path}: {name!r} is given twice ({key!r}); keep one")
        values[name] = value
    return values


def check_fields(cfg: Any) -> None:
    """Values set from a file or in code get the checks flags get as they enter: a choice
    is one of its `Literal`'s values; a float is finite (unless its field allows otherwise)."""
    hints = typing.get_type_hints(type(cfg))
    for field in dataclasses.fields(cfg):
        choices = _choices(hints[field.name])
        value = getattr(cfg, field.name)
        if choices is not None and value is not None and value not in choices:
            raise InputError(
                f"{flag_name(field.name)} must be one of {', '.join(map(str, choices))}, "
                f"got {value!r}"
            )
        if field.metadata.get("finite", True):
            for item in value if isinstance(value, list | tuple) else (value,):
                if isinstance(item, float):
                    check_finite(field.name, item)


def config_from_dict(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """Build a config from a mapping (a config file, a checkpoint's config.json)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        hints_text = []
        for key in unknown:
            close = difflib.get_close_matches(key, names, n=1)
            hints_text.append(f"{key} (did you mean {close[0]}?)" if close else key)
        raise InputError(
            f"{source}: unknown field(s) {', '.join(hints_text)}; "
            f"known fields: {', '.join(sorted(names))}"
        )
    finite = {f.name: f.metadata.get("finite", True) for f in dataclasses.fields(cls)}
    cfg = cls(**{k: _coerce(k, hints[k], v, finite[k]) for k, v in values.items()})
    check_fields(cfg)
    return cfg


def parse_config(cls: type[C], argv: list[str] | None = None, description: str | None = None) -> C:
    """Parse the command line into `cls`; print and exit on `--dry-run` or a bad value.

    Precedence: dataclass defaults < `--config` file < command-line flags. Flags may be
    spelled with underscores (`--batch_size`), and the class's `foreign_flags` (diffusers'
    example flags) are translated or refused; an unknown flag gets "did you mean".
    """
    parser = build_parser(cls, description)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        argv = _translate_foreign_flags(argv, cls, parser)
    except InputError as err:
        parser.error(str(err))
    argv = _attach_dash_values(_hyphenate_flags(argv, parser), parser)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(_unknown_arguments_message(unknown, parser))
    args = vars(namespace)
    config_file = args.pop("config")
    dry_run = args.pop("dry_run")
    try:
        values = read_config_file(config_file) if config_file else {}
        values.update(args)
        cfg = config_from_dict(cls, values, f"--config {config_file}" if config_file else "config")
        text = dry_run_yaml(cfg) if dry_run else ""
    except InputError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if dry_run:
        print(text, end="")
        sys.exit(0)
    return cfg


def dry_run_yaml(cfg: Any) -> str:
    """What `--dry-run` prints: the resolved config as YAML, where the fields a run takes from
    its data (a config's `taken_from_the_data()`: --resolution, --channels) hold the values it
    will use, each with a comment saying where it comes from (null: only the run can tell)."""
    notes = cfg.taken_from_the_data() if hasattr(cfg, "taken_from_the_data") else {}
    values = to_dict(cfg)
    values.update({name: value for name, (value, _) in notes.items()})
    lines = []
    for line in yaml.safe_dump(values, sort_keys=False).splitlines():
        name = line.split(":", 1)[0]
        lines.append(f"{line}  # {notes[name][1]}" if name in notes else line)
    return "\n".join(lines) + "\n"


def _unknown_arguments_message(unknown: list[str], parser: argparse.ArgumentParser) -> str:
    """argparse's "unrecognized arguments", with the closest flag for each unknown one."""
    known = [s for s in parser._option_string_actions if s.startswith("--")]
    words = []
    for arg in unknown:
        name = arg.partition("=")[0]
        if name.startswith("--"):
            close = difflib.get_close_matches(name.replace("_", "-"), known, n=1, cutoff=0.6)
            if close:
                arg = f"{arg} (did you mean {close[0]}?)"
        words.append(arg)
    return f"unrecognized arguments: {' '.join(words)}"


def _translate_foreign_flags(
    argv: list[str], cls: type, parser: argparse.ArgumentParser
) -> list[str]:
    """Rewrite another tool's flags (`cls.foreign_flags`) to this script's, or refuse them."""
    table: Mapping[str, ForeignFlag] = getattr(cls, "foreign_flags", {})
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    out, rest = [], list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--":  # what follows is not a flag
            return [*out, arg, *rest]
        name, sep, value = arg.partition("=")
        flag = table.get(name)
        if flag is None or name in parser._option_string_actions:
            out.append(arg)
            continue
        value_follows = not sep and bool(rest) and not rest[0].startswith("--")
        if flag.ignored:
            if value_follows:
                rest.pop(0)
            _note(f"{name} is ignored: {flag.note}")
            continue
        if flag.field is None:
            raise InputError(
                f"{name} (a flag of diffusers' training examples) is not supported here: "
                f"{flag.note}"
            )
        if flag.field not in fields:
            raise InputError(
                f"{name} is {flag_name(flag.field)} in this toolkit, a flag this script does "
                "not have"
            )
        if flag.values is not None and (sep or value_follows):
            value = value if sep else rest.pop(0)
            if value not in flag.values:
                raise InputError(
                    f"{name} {value} has no equivalent here: {flag_name(flag.field)} takes "
                    f"{', '.join(sorted(set(flag.values.values())))} ({name} "
                    f"{', '.join(flag.values)} are accepted)"
                )
            value, sep = flag.values[value], "="
        if flag.note:
            _note(f"{name} is {flag_name(flag.field)} here: {flag.note}")
        out.append(flag_name(flag.field) + sep + value)
    return out


def _note(message: str) -> None:
    """A one-line note on stderr, printed once (by the launcher's first process)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {message}", file=sys.stderr)


def _hyphenate_flags(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Accept `--batch_size` (the spelling of diffusers' examples) for `--batch-size`."""
    known = set(parser._option_string_actions)
    out = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        if name.startswith("--") and name not in known:
            hyphenated = "--" + name[2:].replace("_", "-")
            if hyphenated in known:
                arg = hyphenated + sep + value
        out.append(arg)
    return out


# A value that starts with a dash but is no flag: `-1,2`, `-0.5`, `-inf` (argparse takes only
# `-1` and `-0.5` for numbers, and stops at the others with "expected one argument").
_DASH_VALUE = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)


def _attach_dash_values(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`--flag -1,2` -> `--flag=-1,2` for a flag that takes one value, so that the value
    reaches the field's own check ("needs 0 <= LOW < HIGH; got '-1,2'")."""
    out, rest = [], list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            return [*out, arg, *rest]
        action = parser._option_string_actions.get(arg)
        takes_one = action is not None and action.nargs is None and action.option_strings
        if (
            takes_one
            and rest
            and _DASH_VALUE.match(rest[0])
            and rest[0] not in parser._option_string_actions
        ):
            arg = f"{arg}={rest.pop(0)}"
        out.append(arg)
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: Path) -> None:
    """Write the resolved config (YAML), atomically."""
    write_text(path, to_yaml(cfg))
