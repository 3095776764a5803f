"""Exceptions that slimkit raises for bad input.

Every error names *what* is wrong (a recipe field, a file, a layer) so that a
user can fix it without reading a traceback.
"""

from __future__ import annotations


class SlimkitError(Exception):
    """Base class for every error slimkit raises on purpose."""


class ConfigError(SlimkitError, ValueError):
    """A configuration value is invalid; ``path`` names the field (``steps[2].epochs``)."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)

    def prefixed(self, prefix: str) -> ConfigError:
        """The same error seen from an enclosing object (``steps[1]`` + ``epochs``)."""
        if not prefix:
            return self
        path = f"{prefix}.{self.path}" if self.path and not self.path.startswith("[") else prefix + self.path
        return ConfigError(path, self.message)


class DataError(SlimkitError):
    """A data file is missing or malformed; the message names the file."""


class ModelError(SlimkitError):
    """A model cannot be loaded or a layer cannot be handled; the message names it."""
