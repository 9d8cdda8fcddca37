"""One config convention for every entry point.

Each stage takes ONE frozen dataclass (`TrainConfig`, `PrecomputeOptions`, ...) whose
fields are declared with `setting(default, help=...)` and which validates itself in
`__post_init__`, raising `PactError` with the CLI flag's name. The click command builds
its options from the same fields with `cli_options(Config)`, so a default or a help
text is written once, next to the field it belongs to.

    @dataclass(frozen=True)
    class Options:
        batch_size: int = setting(8, help="Examples per forward pass.")

        def __post_init__(self) -> None:
            check_int(self.batch_size, flag(Options, "batch_size"))

    @click.command()
    @cli_options(Options)
    def command(**values): run(Options(**values))
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import click

from pact.core.errors import PactError

_PATH_KINDS = {"file": (True, False), "dir": (False, True), "any": (True, True)}
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str | None = None,
    choices: Sequence[str] | None = None,
    path: str | None = None,
    factory: Callable[[], Any] | None = None,
    cli: bool = True,
) -> Any:
    """A config field with its CLI metadata.

    `flag` defaults to `--field-name`; `choices` makes a `click.Choice`; `path` is
    'file', 'dir' or 'any' (a `click.Path` of that kind); `cli=False` keeps the field off
    the command line (set from Python only)."""
    if path is not None and path not in _PATH_KINDS:
        raise ValueError(f"setting(path=...) must be one of {sorted(_PATH_KINDS)}, got {path!r}")
    metadata = {"help": help, "flag": flag, "choices": choices, "path": path, "cli": cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _fields(config: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config) if "help" in f.metadata]


def flag(config: type, name: str) -> str:
    """The CLI flag of field `name` of `config` (for error messages)."""
    field = next(f for f in dataclasses.fields(config) if f.name == name)
    return field.metadata.get("flag") or "--" + name.replace("_", "-")


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(type without None, whether None is allowed)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


class _CommaList(click.ParamType):
    """`a,b,c` -> ('a', 'b', 'c'); blanks dropped."""

    name = "list"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        return tuple(part.strip() for part in str(value).split(",") if part.strip())


def _option(config: type, field: dataclasses.Field, hint: Any) -> Callable:
    base, _ = _base_type(hint)
    meta = field.metadata
    required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    default = None
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    kwargs: dict[str, Any] = {"help": meta["help"], "required": required}
    if base is bool:
        kwargs.update(is_flag=True, default=bool(default))
    else:
        if meta["choices"] is not None:
            kwargs["type"] = click.Choice(list(meta["choices"]))
        elif meta["path"] is not None:
            file_okay, dir_okay = _PATH_KINDS[meta["path"]]
            kwargs["type"] = click.Path(file_okay=file_okay, dir_okay=dir_okay, path_type=str)
        elif typing.get_origin(base) is tuple:
            kwargs["type"] = _CommaList()
            default = ",".join(default) if default is not None else None
        elif base in (int, float, str):
            kwargs["type"] = base
        else:
            raise TypeError(f"{config.__name__}.{field.name}: no CLI type for {hint!r}")
        kwargs["default"] = default
        kwargs["show_default"] = default is not None
    return click.option(flag(config, field.name), field.name, **kwargs)


def cli_options(config: type, *, exclude: Sequence[str] = ()) -> Callable[[Callable], Callable]:
    """A decorator adding one click option per CLI field of `config`, in field order,
    with the field's default and help; the command receives them under the field names."""
    hints = typing.get_type_hints(config)
    fields = [f for f in _fields(config) if f.metadata["cli"] and f.name not in exclude]

    def decorate(command: Callable) -> Callable:
        for field in reversed(fields):
            command = _option(config, field, hints[field.name])(command)
        return command

    return decorate


def take(config: type, values: dict[str, Any]) -> dict[str, Any]:
    """Remove and return the entries of `values` that are CLI fields of `config` (for a
    config nested in another, e.g. the gate options of `TrainConfig.pact`)."""
    names = {f.name for f in _fields(config) if f.metadata["cli"]}
    return {name: values.pop(name) for name in list(values) if name in names}


# ----------------------------------------------------------------------------- checks


def check_int(value: Any, name: str, minimum: int = 1) -> None:
    """An integer >= minimum (booleans refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PactError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_number(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    inclusive: bool = True,
    below: float | None = None,
    at_most: float | None = None,
) -> None:
    """A finite number within the given bounds (booleans refused)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value >= minimum if inclusive else value > minimum
    if ok and below is not None:
        ok = value < below
    if ok and at_most is not None:
        ok = value <= at_most
    if not ok:
        bounds = []
        if minimum is not None:
            bounds.append(f"{'>=' if inclusive else '>'} {minimum:g}")
        if below is not None:
            bounds.append(f"< {below:g}")
        if at_most is not None:
            bounds.append(f"<= {at_most:g}")
        where = f" {' and '.join(bounds)}" if bounds else ""
        raise PactError(f"{name} must be a finite number{where}, got {value!r}")


def check_device(value: Any, name: str) -> None:
    """auto, cpu, cuda or cuda:<index> (whether CUDA is there is checked when it is used)."""
    if not isinstance(value, str) or not DEVICE_PATTERN.match(value):
        raise PactError(f"{name} {value!r} must be auto, cpu, cuda or cuda:<index>")


def check_choice(value: Any, choices: Sequence[str], name: str) -> None:
    """One of `choices`."""
    if value not in choices:
        raise PactError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")


def check_fields(config: Any, checks: Mapping[str, Callable[[Any, str], None]]) -> None:
    """Run `check(value, flag)` for each named field of the dataclass instance `config`."""
    for name, check in checks.items():
        check(getattr(config, name), flag(type(config), name))
