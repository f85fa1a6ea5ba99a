"""Errors a user can fix. run.py prints their message without a traceback and exits with status 2."""


class UserError(Exception):
    """Base for every problem caused by the user's input (config, data, paths, environment)."""


class ConfigError(UserError):
    """The YAML/JSON config is malformed, has unknown keys, wrong types or impossible values."""


class DatasetError(UserError):
    """The dataset folders hold files that cannot be trained on; the message lists every problem with its path."""


class ArchitectureError(UserError):
    """An unknown architecture was asked for, or the model folder does not fit the architecture."""
