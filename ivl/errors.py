"""The kit's known failures. Each is raised with a message that names the file, line or key and says what to do; the
command line prints it as one `error:` line and exits 2, never a traceback. This module imports nothing heavy, so
the command line can catch these errors without importing torch."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the dotted key."""


class DataSourceError(ValueError):
    """A data file or meta file that cannot be read at all (as opposed to one bad row)."""


class SampleError(ValueError):
    """A sample that cannot become a correct training example; the message says why."""


class ImageError(ValueError):
    """An image that cannot be used: unreadable, missing, or too large. The message says which and why."""


class ModelLoadError(RuntimeError):
    """The model or tokenizer cannot be loaded; the message says what was tried and what to do."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed from; the message says why and what to do."""


class DivergenceError(RuntimeError):
    """A training step's loss or gradient norm is not finite; the message names the step and its rows."""


class OutputError(RuntimeError):
    """The output folder cannot be written (disk full, read-only, a file in the way) or another run holds it."""


class PartialLoraMergeError(RuntimeError):
    """A partial-LoRA adapter was asked to merge into the weights; it cannot be."""


KNOWN_ERRORS = (
    ConfigError,
    DataSourceError,
    ModelLoadError,
    SampleError,
    ImageError,
    CheckpointError,
    DivergenceError,
    OutputError,
    PartialLoraMergeError,
)
