"""The registry of evaluation protocols: each entry is a callable plus the facts its callers ask about.

A leaf module: it imports nothing of medssl but :mod:`medssl.errors`, so anything may read it. The protocols
themselves register on import (:mod:`medssl.eval.protocol` registers ``linear``, ``knn`` and ``collapse``,
:mod:`medssl.eval.finetune` ``finetune``, :mod:`medssl.eval.segment` ``segment``); importing the
:mod:`medssl.eval` package imports them.

An entry answers, for its name:

* ``inputs`` — ``"features"``: the callable takes a :class:`~medssl.eval.protocol.FeatureSet` of frozen
  features; ``"images"``: an :class:`~medssl.eval.images.ImageTask` (it trains on the images).
* ``needs_labels`` — whether the dataset must carry image-level labels (``segment`` needs masks instead,
  ``collapse`` nothing).
* ``deterministic`` — the output is a function of the train / validation subsets alone, so a seed that draws
  the same subsets as an earlier seed reuses its result (:func:`~medssl.eval.protocol.run_protocol`).
* ``trains`` — the protocol has a training length (``--epochs``).
* ``help`` — one line for the command line's ``--protocol`` help.
* ``forwards_to`` / ``filled`` — the function the protocol hands its ``**options`` to, and the keyword
  arguments of it that the protocol fills itself; the remaining keywords are the accepted options.
* ``whole_dataset`` — optional ``fn(encoders, dataset, out_dir, *, batch_size, device, meta, progress) ->
  result``: what :func:`medssl.api.evaluate` runs instead of label fractions × seeds when the protocol
  measures every image of the dataset once (``collapse``: spectrum plot, features before whitening).

:data:`PROTOCOLS` maps a name to its callable (``PROTOCOLS["knn"](data, subset, seed, ...)``); assigning
``PROTOCOLS[name] = fn`` replaces the callable and keeps the entry's facts. :func:`protocol_entry` gives
the whole entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, MutableMapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Literal

from medssl.errors import ConfigError

ProtocolFn = Callable[..., Any]
"""``fn(data, train_subset, seed, *, val_subset, **options) -> ProtocolOutput``."""

Inputs = Literal["features", "images"]
INPUTS: tuple[str, ...] = ("features", "images")


@dataclass(frozen=True)
class ProtocolEntry:
    """A registered evaluation protocol and the facts about it (see the module docstring)."""

    name: str
    fn: ProtocolFn
    inputs: Inputs = "features"
    needs_labels: bool = True
    deterministic: bool = False
    trains: bool = False
    help: str = ""
    forwards_to: Callable[..., Any] | None = None
    filled: frozenset[str] = field(default_factory=frozenset)
    whole_dataset: Callable[..., Any] | None = None


class ProtocolRegistry(MutableMapping[str, ProtocolFn]):
    """Name -> protocol callable, backed by :class:`ProtocolEntry` objects (registration order kept)."""

    def __init__(self) -> None:
        self._entries: dict[str, ProtocolEntry] = {}

    def __getitem__(self, name: str) -> ProtocolFn:
        return self._entries[name].fn

    def __setitem__(self, name: str, fn: ProtocolFn) -> None:
        old = self._entries.get(name)
        self._entries[name] = ProtocolEntry(name, fn) if old is None else dataclasses.replace(old, fn=fn)

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, entry: ProtocolEntry) -> None:
        """Register ``entry``; raises :class:`~medssl.errors.ConfigError` when its name is taken."""
        if entry.name in self._entries:
            raise ConfigError(f"evaluation protocol {entry.name!r} is already registered")
        self._entries[entry.name] = entry

    def entry(self, name: str) -> ProtocolEntry:
        """The entry of ``name``; raises :class:`~medssl.errors.ConfigError` listing the registered names."""
        if name not in self._entries:
            raise ConfigError(f"unknown evaluation protocol {name!r}; available: {sorted(self._entries)}")
        return self._entries[name]

    def entries(self) -> list[ProtocolEntry]:
        """Every entry, in registration order."""
        return list(self._entries.values())


class NamesWhere(AbstractSet[str]):
    """The live set of protocol names whose entry satisfies ``predicate`` (recomputed on every use)."""

    def __init__(self, registry: ProtocolRegistry, predicate: Callable[[ProtocolEntry], bool]) -> None:
        self._registry = registry
        self._predicate = predicate

    def _names(self) -> list[str]:
        return [e.name for e in self._registry.entries() if self._predicate(e)]

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _from_iterable(cls, it: Any) -> frozenset[str]:
        return frozenset(it)

    def __repr__(self) -> str:
        return f"NamesWhere({sorted(self._names())})"


PROTOCOLS = ProtocolRegistry()
"""Every registered evaluation protocol: name -> callable; :func:`protocol_entry` for the facts."""


def register_protocol(
    name: str,
    *,
    inputs: Inputs = "features",
    needs_labels: bool = True,
    deterministic: bool = False,
    trains: bool = False,
    help: str = "",
    forwards_to: Callable[..., Any] | None = None,
    filled: frozenset[str] | set[str] = frozenset(),
    whole_dataset: Callable[..., Any] | None = None,
) -> Callable[[ProtocolFn], ProtocolFn]:
    """Decorator registering a protocol callable under ``name`` with its facts (see the module docstring).

    Raises:
        ConfigError: ``name`` is already registered, or ``inputs`` is not ``features`` / ``images``.
    """
    if inputs not in INPUTS:
        raise ConfigError(f"evaluation protocol {name!r}: inputs must be one of {INPUTS}, got {inputs!r}")

    def decorator(fn: ProtocolFn) -> ProtocolFn:
        PROTOCOLS.add(ProtocolEntry(name, fn, inputs, needs_labels, deterministic, trains, help, forwards_to,
                                    frozenset(filled), whole_dataset))
        return fn

    return decorator


def protocol_entry(name: str) -> ProtocolEntry:
    """The registered entry of ``name``; a :class:`~medssl.errors.ConfigError` naming the others if there is none."""
    return PROTOCOLS.entry(name)


def protocol_names() -> list[str]:
    """Registered protocol names, in registration order (the CLI's ``--protocol`` choices)."""
    return list(PROTOCOLS)


def protocols_help() -> str:
    """``name: help`` of every registered protocol, ``; ``-separated (the CLI's ``--protocol`` help)."""
    return "; ".join(f"{e.name}: {e.help}" if e.help else e.name for e in PROTOCOLS.entries())
