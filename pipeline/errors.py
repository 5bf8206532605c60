"""Errors a user can act on.

Every error that reaches the user through the CLI is a :class:`DkpError`: its message names the
thing (file, field, value) and the fix, and the CLI turns it into exit code 2 without a traceback.
Anything else escaping the CLI is a bug in this tool and keeps its traceback.
"""
from __future__ import annotations


class DkpError(Exception):
    """A problem with the user's input or environment; message says what and how to fix it."""

    exit_code = 2


class ConfigError(DkpError):
    """Bad experiment YAML or ``--set`` override."""


class ManifestError(DkpError):
    """Bad dataset layout, annotation file or manifest file."""


class LockError(DkpError):
    """Another live process is writing the same artifact."""


class CacheError(DkpError):
    """A depth cache that is corrupt, incomplete or does not match the requested spec."""


class CheckpointError(DkpError):
    """A weights/checkpoint file that is missing, untrusted or does not fit the model/config."""


def printable(text: str) -> str:
    """``text`` as valid UTF-8: a file name's undecodable bytes (kept by Python as surrogates) become ``\\xNN``,
    so that it can be printed or stored in HDF5 (which needs UTF-8) without an error."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
