"""The method registry: names → :class:`~medssl.methods.base.Method` classes, and the one way to build a method.

A leaf: it imports nothing of medssl but :mod:`medssl.errors` (the method classes bring their own
configuration handling), so anything may import it. Methods register themselves with ``@register`` when
their module is imported; ``import medssl.methods`` imports every module of the package, so a new method is
one new file in ``src/medssl/methods/`` (see ``docs/architecture.md``, "Adding a method").
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import TYPE_CHECKING, Any

from medssl.errors import ConfigError

if TYPE_CHECKING:  # annotations only: no import of the method layer at run time
    from medssl.config import PretrainConfig
    from medssl.methods.base import DataInfo, Method

__all__ = ["METHODS", "build_method", "get_method", "method_table", "register", "resolve_method_config"]

METHODS: dict[str, type[Method[Any]]] = {}


def register(cls: type[Method[Any]]) -> type[Method[Any]]:
    """Class decorator adding a method to the registry under ``cls.name``.

    Raises:
        ValueError: the class has no name, or another class is registered under it already.
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no registry name")
    known = METHODS.get(cls.name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"method name '{cls.name}' is registered twice ({known.__qualname__}, {cls.__qualname__})")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method[Any]]:
    """Look up a method class by registry name.

    Raises:
        ConfigError: unknown name, listing the registered ones.
    """
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown method '{name}'{hint}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_table() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered method, sorted."""
    return [(n, METHODS[n].description) for n in sorted(METHODS)]


def resolve_method_config(section: dict[str, Any]) -> dict[str, Any]:
    """Validate a recipe's ``method:`` section against the method's config dataclass; fill defaults.

    Returns:
        The section as plain Python (tuples as lists), every field present.

    Raises:
        ConfigError: no or an unknown method name, an unknown key, a wrong type or an out-of-range value,
            naming ``method.<key>``.
    """
    name = section.get("name")
    if not name:
        raise ConfigError("the config has no method name (method.name / --method)")
    cls = get_method(str(name))
    out = dataclasses.asdict(cls.parse_hparams({**section, "name": str(name)}))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def build_method(cfg: PretrainConfig, data: DataInfo, *, init_weights: bool = True) -> Method[Any]:
    """Build the method a run config names, for data described by ``data``: the one construction path.

    First :meth:`~medssl.methods.base.Method.resolve_defaults` fills in, in ``cfg``, the settings the method
    derives from the data (MAE's ViT, patch size and pooling), so that the ``config.yaml`` written afterwards
    records what was built; then the method is constructed from its typed hyper-parameters, ``cfg.model``,
    ``cfg.views`` and ``data``. Settings that only fail together with the data (a patch size that does not
    divide the image, an image smaller than the backbone's stride) raise here, before anything trains.

    ``init_weights=False`` builds without reading the ``init_from`` weights (``model.init_from`` and any method
    field ending in ``init_from``): for a method whose weights come from a checkpoint next (``--resume``,
    ``evaluate --checkpoint``), so that a moved or deleted initial weights file does not matter there.

    Raises:
        ConfigError: an unknown method or settings that do not fit the data, naming the keys.
    """
    cls = get_method(cfg.method_name)
    cls.resolve_defaults(cfg, data)
    hparams, model = cls.parse_hparams(cfg.method), cfg.model
    if not init_weights:
        model = dataclasses.replace(model, init_from=None)
        hparams = dataclasses.replace(hparams, **{f.name: None for f in dataclasses.fields(hparams)
                                                 if f.name.endswith("init_from")})
    return cls(hparams, model, cfg.views, data)
