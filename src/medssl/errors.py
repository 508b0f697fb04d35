"""User-facing errors.

Every problem a user can cause (bad data spec, missing file, unknown method, bad ``--set``) is raised as a
:class:`MedsslError` subclass with a message that names the file or value and the problem. The CLI prints
the message and exits with code 2; it never shows a traceback for these.
"""

from __future__ import annotations


class MedsslError(Exception):
    """Base class of all errors caused by user input."""


class ConfigError(MedsslError):
    """A recipe, ``--set`` override or CLI flag is invalid."""


class DataError(MedsslError):
    """A data spec, file or manifest is invalid or unreadable."""


class CheckpointError(MedsslError):
    """A run directory or checkpoint is missing, corrupt or incompatible."""


class StorageError(MedsslError):
    """The disk refused a write (full, read-only, no permission); the message names the file and the cause."""


class RunLockedError(MedsslError):
    """Another live process is writing the same run directory."""
