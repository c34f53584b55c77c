"""Exceptions raised at the boundaries of the ReCo core.

Every error a user can cause (bad image, bad weights, unknown concept, empty archive, bad
config) has its own type so callers (jobs, Ray UDFs) can count or report it precisely.
"""

from __future__ import annotations


class ReCoError(Exception):
    """Base class of every error raised on purpose by reco-cluster."""


class ConfigError(ReCoError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class WeightsError(ReCoError):
    """Model weights could not be found or do not fit the requested architecture."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """A weight file or directory named by the user does not exist."""


class WeightsMismatchError(WeightsError, ValueError):
    """A weight file exists but does not fit the architecture it was loaded into."""


class ImageDecodeError(ReCoError, ValueError):
    """Bytes could not be decoded into an RGB image (corrupt, truncated, empty, unsupported)."""


class EmptyArchiveError(ReCoError, ValueError):
    """A concept's archive holds no usable image."""


class UnknownConceptError(ReCoError, KeyError):
    """A concept name is not in the concept bank."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown concept"


class ClipUnavailableError(ReCoError, RuntimeError):
    """A step needs CLIP but the pipeline was built without CLIP weights."""


class BadInputError(ReCoError, ValueError):
    """An input that can never be read as an image, whatever the retries: a broken symlink, a
    directory or special file, a name that is not valid UTF-8. Skipped for good, with a reason."""


class TransientIOError(ReCoError, OSError):
    """Reading an input failed in a way a retry may fix (I/O error, a listed file missing on this
    node, S3 timeout / throttling / 5xx, connection error), after the reader's own retries.

    Never recorded as skipped: the input stays unprocessed so that a rerun tries it again."""
