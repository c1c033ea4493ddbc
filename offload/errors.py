"""Typed errors raised by the engine.

Every error a user can cause (a bad path, a damaged checkpoint, an unsupported model, an
impossible setting) is an ``OffloadError`` whose message is one line naming the file, tensor
or setting at fault. The CLI prints that line and exits 2; library code never prints or exits.
``shown`` puts an arbitrary value (a JSON field, a setting) into such a line.
"""


def shown(value: object, limit: int = 60, *, one_line: bool = False) -> str:
    """A value for an error message: its repr, at most ``limit`` characters (a value too deep,
    or an integer too long, to print is named by its type); ``one_line``: every run of
    whitespace as one space."""
    try:
        text = repr(value)
    except Exception:  # RecursionError, ValueError (int digits limit), a broken __repr__
        text = f"<{type(value).__name__}>"
    if one_line:
        text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class OffloadError(Exception):
    """Base class of every error the engine raises for bad input."""


class ConfigError(OffloadError):
    """config.json is missing, unreadable, or describes a model this engine does not run."""


class UnsupportedModelError(ConfigError):
    """The checkpoint's architecture is not one of the Mixtral family."""


class CheckpointError(OffloadError):
    """A safetensors checkpoint is missing, incomplete or damaged."""


class MissingShardError(CheckpointError):
    """A shard named by model.safetensors.index.json is not on disk."""


class CorruptCheckpointError(CheckpointError):
    """A safetensors file is truncated, has a malformed header, data outside its bounds or
    overlapping, a tensor in two shards, or a NaN or Inf weight."""


class ConfigMismatchError(CheckpointError):
    """config.json does not describe the tensors on disk (a layer or expert it does not count)."""


class MissingTensorError(CheckpointError):
    """A tensor the model needs is in no shard."""


class TensorShapeError(CheckpointError):
    """A tensor has the wrong shape or dtype for the model's configuration."""


class TokenizerError(OffloadError):
    """tokenizer.model / tokenizer.json is missing or unreadable, or a token id is out of range."""


class SettingError(OffloadError):
    """A generation or engine setting is out of range (temperature, top-p, dtype, device...)."""


class PackError(OffloadError):
    """An offload pack is missing a file, is from a newer format, or cannot be written."""


class CorruptPackError(PackError):
    """A pack's file fails its checksum (an expert record, a dense tensor, the dense header, the
    manifest), holds a NaN or Inf weight, is truncated, or disagrees with the manifest."""


class BudgetError(SettingError):
    """A memory budget cannot hold what the model needs (the message states the minimum)."""


class OutputError(OffloadError):
    """A file or pack the tool writes: the target exists (and --force was not given), is not
    the tool's to replace (a link, directory, device node, or a directory holding other files),
    is being written by another run, or the write failed (a full disk, no permission)."""
