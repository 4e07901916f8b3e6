"""The error types user-facing failures are raised as (all `ValueError`s, each naming what to fix)."""


class ConfigError(ValueError):
    """A model description (config.json, preset, recipe) is malformed or unsupported."""


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, malformed, or does not match its config."""


class DataError(ValueError):
    """Training or evaluation data is missing, unreadable, or not in the expected schema."""
