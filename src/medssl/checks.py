"""Validation of configuration values: one helper for ranges and one for choices.

Config dataclasses check their own fields in ``__post_init__`` with these helpers, so a value is validated
once, where it is defined. The helpers raise :class:`FieldError` naming the field only (``batch_size must be
>= 1, got -4``); :func:`medssl.config.build_dataclass` prefixes the section path, so the user reads
``train.batch_size must be >= 1, got -4``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from medssl.errors import ConfigError


class FieldError(ConfigError):
    """A config field holds a value outside its allowed range or choices.

    Attributes:
        field: the field's name within its dataclass (``build_dataclass`` adds the section path).
        problem: the rest of the message, starting after the field name.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem

    def at(self, where: str) -> ConfigError:
        """The same error with ``where`` (e.g. ``train``) in front of the field name."""
        return ConfigError(f"{where}.{self.field} {self.problem}" if where else str(self))


def _num(v: float) -> str:
    """A bound as written: integers in full (``2147483647``), other numbers compactly (``0.5``, ``1e-08``)."""
    return str(v) if isinstance(v, int) else f"{v:g}"


def _bounds_text(ge: float | None, gt: float | None, le: float | None, lt: float | None) -> str:
    low = f">= {_num(ge)}" if ge is not None else (f"> {_num(gt)}" if gt is not None else "")
    high = f"<= {_num(le)}" if le is not None else (f"< {_num(lt)}" if lt is not None else "")
    if low and high:
        lo_b = "[" if ge is not None else "("
        hi_b = "]" if le is not None else ")"
        lo_v = ge if ge is not None else gt
        hi_v = le if le is not None else lt
        return f"in {lo_b}{_num(lo_v)}, {_num(hi_v)}{hi_b}"
    return low or high or "a finite number"


def check_range(field: str, value: Any, *, ge: float | None = None, gt: float | None = None,
                le: float | None = None, lt: float | None = None, allow_none: bool = False) -> None:
    """Require a finite number within the given bounds (``ge``: >=, ``gt``: >, ``le``: <=, ``lt``: <).

    Raises:
        FieldError: ``value`` is not a number, not finite (NaN, inf) or out of bounds; the message gives the
            allowed range.
    """
    if value is None and allow_none:
        return
    text = _bounds_text(ge, gt, le, lt)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FieldError(field, f"must be a finite number {text}, got {value!r}")
    if ((ge is not None and value < ge) or (gt is not None and value <= gt)
            or (le is not None and value > le) or (lt is not None and value >= lt)):
        raise FieldError(field, f"must be {text}, got {value!r}")


def check_choice(field: str, value: Any, choices: Iterable[Any], *, allow_none: bool = False) -> None:
    """Require ``value`` to be one of ``choices``.

    Raises:
        FieldError: naming the allowed values.
    """
    if value is None and allow_none:
        return
    options = tuple(choices)
    if value not in options:
        raise FieldError(field, f"must be one of {', '.join(map(str, options))}, got {value!r}")
