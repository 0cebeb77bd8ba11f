"""Command-line options from a config dataclass: one ``--field-name`` option per field.

The training entry points in ``scripts/`` describe everything a run depends on as a
dataclass with a documented default per field; :func:`add_config_arguments` turns its fields
into options (help = the field's docstring) and :func:`config_from_args` builds the config
back from the parsed arguments.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` and of its dataclass bases (empty
    where there is none; a subclass's docstring wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls) -> dict[str, str]:
    """The docstrings under the fields written in ``cls``'s own class body."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        is_doc = isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and is_doc:
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def parse_bool(text: str) -> bool:
    """``true/yes/1/on`` or ``false/no/0/off`` (any case) -> bool; anything else is an error."""
    key = text.strip().lower()
    if key in ("true", "yes", "1", "on"):
        return True
    if key in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """Add ``--name`` (underscores as dashes) for every field of ``cls`` not in ``skip``.

    The default and the type come from the field's default value; tuple fields take one or
    more values (``nargs="+"``, the type of the default's first item), bool fields ``true`` or
    ``false``.
    """
    docs = field_docs(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        value = getattr(defaults, f.name)
        option = f"--{f.name.replace('_', '-')}"
        help_text = (docs.get(f.name, "") + f" (default: {value})").replace("%", "%%")
        if isinstance(value, tuple):
            item_type = type(value[0]) if value else str
            parser.add_argument(option, type=item_type, nargs="+", default=value, help=help_text)
        elif isinstance(value, bool):
            parser.add_argument(option, type=parse_bool, default=value, help=help_text)
        else:
            parser.add_argument(option, type=type(value), default=value, help=help_text)


def config_from_args(cls, args: argparse.Namespace, **overrides):
    """An instance of ``cls`` from the parsed options (lists become tuples), then
    ``overrides``."""
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            v = getattr(args, f.name)
            values[f.name] = tuple(v) if isinstance(v, list) else v
    values.update(overrides)
    return cls(**values)
