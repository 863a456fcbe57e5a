"""Errors raised when an artifact is missing, malformed, or belongs to another run.

They derive from the built-in classes a caller would expect (FileNotFoundError, ValueError), and live in `clip`,
so the CLI reports them as bad input in one line instead of a traceback.
"""

from __future__ import annotations


class MissingInputError(FileNotFoundError):
    """A stage's input is not there (raw shards, keep.parquet, a manifest, an evaluation folder)."""


class FormatError(ValueError):
    """An artifact exists but does not follow its format (docs/formats.md); the message names the file."""


class StaleInputError(ValueError):
    """An input belongs to another run: e.g. keep.parquet does not match the raw pool it names.

    Raw keys are positional (`000000042`), so a collect rerun with another config reuses the same keys for other
    images; the keep-list of the old pool must then be refused, not published against the new one.
    """
