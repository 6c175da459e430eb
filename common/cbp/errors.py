"""Every error type of the library, in one leaf module (it imports nothing of ``cbp``).

A :class:`UserError` is one the user can fix (missing data or checkpoint, bad option, a
diverged run); the command-line scripts print it as one ``error:`` line, without a
traceback, and exit with status 1.
"""

from __future__ import annotations


class UserError(RuntimeError):
    """An error the user can fix: printed as one line, no traceback."""


class CheckpointError(UserError):
    """A checkpoint is missing, damaged or does not fit the model."""


class DatasetMissing(UserError):
    """A dataset is not on disk (the message says what to put where)."""


class DatasetDamaged(UserError):
    """A dataset file's MD5 differs from the published one (the message names the file)."""


class WriteError(UserError):
    """A file could not be written (disk full, read-only folder, ...): one line, the path."""


class LockedError(UserError):
    """Another live run holds the lock on an output this run would write."""


class Diverged(UserError):
    """Training produced NaN or infinity; the run stops and writes nothing more."""


class RankError(UserError):
    """Raised on every rank when another rank failed: carries that rank's one-line message."""


class ConvertError(UserError, ValueError):
    """A model cannot be converted as asked (nothing to quantize, a tied weight, ...)."""


class NIRExportError(UserError, ValueError):
    """A network (or one of its layers) that cannot be written as NIR; one line naming it."""


__all__ = ["CheckpointError", "ConvertError", "DatasetDamaged", "DatasetMissing", "Diverged", "LockedError",
           "NIRExportError", "RankError", "UserError", "WriteError"]
