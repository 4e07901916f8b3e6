"""The two error types every user-facing failure is raised as."""


class ConfigError(ValueError):
    """A model description (config.json, preset, recipe) is malformed or unsupported."""


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, malformed, or does not match its config."""
