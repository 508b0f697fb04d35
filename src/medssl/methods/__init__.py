"""SSL methods: the contract (:mod:`medssl.methods.base`), the registry (:mod:`medssl.methods.registry`) and one
module per method.

Importing this package imports every module in it, in name order, so that each method registers itself
(``@register``): a new method is one new file here, picked up by ``medssl methods``, the CLI, the trainer
and the contract test (``tests/methods/test_contract.py``) without a line anywhere else.
"""

from __future__ import annotations

import importlib
import pkgutil

from medssl.methods.base import DataInfo, Method, MethodConfig, StepOutput, ViewSpec
from medssl.methods.registry import (
    METHODS,
    build_method,
    get_method,
    method_table,
    register,
    resolve_method_config,
)

_INFRASTRUCTURE = ("base", "registry")

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in _INFRASTRUCTURE and not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["METHODS", "DataInfo", "Method", "MethodConfig", "StepOutput", "ViewSpec", "build_method", "get_method",
           "method_table", "register", "resolve_method_config"]
