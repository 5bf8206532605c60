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


class StorageError(DkpError, OSError):
    """A write the file system refused: full (ENOSPC), over quota (EDQUOT), read-only (EROFS) or failing (EIO).

    Also an :class:`OSError` with the original ``errno`` and ``filename``, so code that already handles a
    read-only store by errno keeps working. The message (built by :func:`pipeline.store.io.storage_error`)
    names the file, the artifact, the space needed where known, and the fix; ``artifact`` is filled in by
    the runner, which knows which stage was writing.
    """

    # How the message is written: set by pipeline.store.io (describe_storage_error), which builds these errors, so
    # that this bottom module imports nothing of the store above it. Computed when printed: the runner fills in the
    # artifact after the error was raised lower down.
    describe = None

    def __init__(self, errno_: int, strerror: str, filename: str, *, what: str = "", needed=None,
                 artifact: str = "") -> None:
        OSError.__init__(self, errno_, strerror, filename)
        self.what, self.needed, self.artifact = what, needed, artifact

    def __str__(self) -> str:
        describe = type(self).describe
        return describe(self) if describe is not None else OSError.__str__(self)


def printable(text: str) -> str:
    """``text`` as valid UTF-8: a file name's undecodable bytes (kept by Python as surrogates) become ``\\xNN``,
    so that it can be printed or stored in HDF5 (which needs UTF-8) without an error."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class CacheStorageError(StorageError, CacheError):
    """A depth-cache write the file system refused: a :class:`StorageError` that code catching
    :class:`CacheError` (the depth stage, its tests) still sees as the cache's error."""
