"""Errors a user can cause (bad files, bad arguments), as opposed to bugs.

The CLI prints these as one sentence instead of a traceback.
"""


class Mistral7BError(Exception):
    """Base class of every error caused by user input."""


class CheckpointError(Mistral7BError, ValueError):
    """A checkpoint folder or file that cannot be loaded: names the file and the key."""


class ConfigError(Mistral7BError, ValueError):
    """A model configuration (params.json, config.json, GGUF metadata) that is invalid."""


class InputError(Mistral7BError, ValueError):
    """A prompt or request the model cannot take (empty, too long, bad token ids)."""
