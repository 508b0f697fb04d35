"""Method registry: ``@register`` a :class:`~medssl.methods.base.Method` subclass under its name."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from medssl.errors import ConfigError
from medssl.methods.base import DataInfo, Method, MethodConfig, StepOutput, ViewSpec

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no registry name")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """Look up a method class by registry name.

    Raises:
        ConfigError: unknown name, listing the registered ones.
    """
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown method '{name}'{hint}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def resolve_method_config(section: dict[str, Any]) -> dict[str, Any]:
    """Validate a recipe's ``method:`` section against the method's config dataclass; fill defaults."""
    from medssl.config import build_dataclass

    name = section.get("name")
    if not name:
        raise ConfigError("the config has no method name (method.name / --method)")
    cls = get_method(str(name))
    cfg = build_dataclass(cls.config_cls, {**section, "name": str(name)}, where="method")
    out = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def method_table() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered method, sorted."""
    return [(n, METHODS[n].description) for n in sorted(METHODS)]


# Importing the modules registers the methods.
from medssl.methods import cass as _cass  # noqa: E402,F401
from medssl.methods import cnnmim as _cnnmim  # noqa: E402,F401
from medssl.methods import gravis as _gravis  # noqa: E402,F401
from medssl.methods import mae as _mae  # noqa: E402,F401
from medssl.methods import medmoco as _medmoco  # noqa: E402,F401
from medssl.methods import miram as _miram  # noqa: E402,F401
from medssl.methods import mocov2 as _mocov2  # noqa: E402,F401

__all__ = ["METHODS", "DataInfo", "Method", "MethodConfig", "StepOutput", "ViewSpec", "get_method", "register",
           "resolve_method_config", "method_table"]
