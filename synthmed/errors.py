"""Exceptions raised by synthmed.

Every error a user can cause derives from :class:`SynthmedError` and from the built-in exception a
Python user would expect (``ValueError`` for bad data, ``ImportError`` for a missing extra), so
``except ValueError`` keeps working while ``except SynthmedError`` catches all of ours.
"""

from __future__ import annotations


class SynthmedError(Exception):
    """Base class of every error raised on purpose by synthmed."""


class SchemaError(SynthmedError, ValueError):
    """The declared or inferred schema does not fit the data (missing, duplicate or unknown columns)."""


class DataError(SynthmedError, ValueError):
    """A value in the data is invalid; the message names the column, the patient and the value."""


class NotFittedError(SynthmedError, AttributeError):
    """A synthesizer was used before ``fit``."""


class ModelFileError(SynthmedError, ValueError):
    """A saved model file is missing, corrupted, of an unknown format or of a newer version."""


class MissingDependencyError(SynthmedError, ImportError):
    """An optional dependency is needed; the message gives the ``pip install`` command."""


class PrivacyError(SynthmedError, ValueError):
    """Private training cannot run as configured (budget, layers, data loader, delta)."""
