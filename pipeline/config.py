"""Config files: TOML whose keys are the fields of a stage's config dataclass.

Precedence, lowest first: the dataclass defaults, a stage's own defaults for the case at hand (``base``: e.g. the
healing schedule that ``init-student`` records in a student's folder), the ``--config`` file, options given on the
command line.
Unknown keys are an error that lists the valid ones (a typo never silently falls back to a default).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import textwrap
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

__all__ = ["resolve_config"]

T = TypeVar("T")


def _load_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise click.BadParameter(f"no such file: {path}", param_hint="--config") from None
    except tomllib.TOMLDecodeError as e:
        raise click.BadParameter(f"{path} is not valid TOML: {e}", param_hint="--config") from None
    # a [label] / [train] table is accepted as well as top-level keys
    return raw


def resolve_config(cls: type[T], ctx: click.Context, section: str, base: Mapping[str, Any] | None = None) -> T:
    """Build ``cls`` from its defaults, ``base``, the ``--config`` file and the explicitly given CLI options."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {k: v for k, v in (base or {}).items() if k in names}
    config_path = ctx.params.get("config")
    if config_path:
        raw = _load_toml(config_path)
        table = raw.get(section, raw) if isinstance(raw.get(section), dict) else raw
        unknown = sorted(set(table) - names)
        if unknown:
            raise click.BadParameter(
                f"{config_path}: unknown keys {', '.join(unknown)}; valid keys are {', '.join(sorted(names))}",
                param_hint="--config",
            )
        values.update(table)
    for name, value in ctx.params.items():
        if name in names and ctx.get_parameter_source(name) is not ParameterSource.DEFAULT:
            values[name] = value
    for key, value in list(values.items()):
        if isinstance(value, Path):
            values[key] = str(value)
    return cls(**values)


_TYPES: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}


def config_options(
    cls: type[Any], choices: Mapping[str, Sequence[str]], *, config_file: bool
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator adding one click option per field of a config dataclass.

    Each option takes its type from the field's annotation (``int``, ``float | None``, ...; ``bool`` becomes a
    ``--x/--no-x`` flag), its default and help from the field, and a choice list from ``choices`` where given.
    Defaults live once, in the dataclass; ``resolve_config`` only takes the options given explicitly.
    """

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        options = []
        for field in dataclasses.fields(cls):
            flag = "--" + field.name.replace("_", "-")
            kind = _TYPES[str(field.type).split("|")[0].strip()]
            default, text = default_of(cls, field.name), field_help(cls, field.name)
            if kind is bool:
                options.append(click.option(f"{flag}/--no-{flag[2:]}", field.name, default=default, help=text))
                continue
            param_type: Any = click.Choice(list(choices[field.name])) if field.name in choices else kind
            show = default not in (None, "")
            options.append(
                click.option(flag, field.name, type=param_type, default=default, show_default=show, help=text)
            )
        if config_file:
            options.append(
                click.option("--config", type=click.Path(dir_okay=False), help="TOML file with any of these options.")
            )
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def default_of(cls: type[Any], name: str) -> Any:
    """A dataclass field's default, so click options show the one default that the config owns."""
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


@functools.cache
def _field_docs(cls: Any) -> dict[str, str]:
    """The docstring under each field of a config dataclass (``x: int = 1`` then ``\"\"\"doc\"\"\"``)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
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


def field_help(cls: Any, name: str) -> str:
    """Help text of a config field, taken from the docstring written under it in the dataclass."""
    return _field_docs(cls).get(name, "")
