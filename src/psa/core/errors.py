"""The error every core module raises for a configuration that cannot run."""


class ConfigError(ValueError):
    """A population or training configuration that cannot run."""
