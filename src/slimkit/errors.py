"""Exceptions that slimkit raises for bad input.

Every error names *what* is wrong (a recipe field, a file, a layer) so that a
user can fix it without reading a traceback.
"""

from __future__ import annotations


class SlimkitError(Exception):
    """Base class for every error slimkit raises on purpose.

    ``exit_code`` is the CLI's exit status for it and ``kind`` the word its message starts with
    (``slimkit: recipe error: steps[0].train.lr: ...``).
    """

    exit_code = 1
    kind = "error"


class BadInputError(SlimkitError):
    """Bad input (a recipe, an override, a data or model file, an output folder): the CLI exits 2."""

    exit_code = 2


class FloorNotMetError(SlimkitError):
    """A search found no candidate within the requested metric floor: the CLI exits 3."""

    exit_code = 3
    kind = "not found"


class ConfigError(BadInputError, ValueError):
    """A configuration value is invalid; ``path`` names the field (``steps[2].epochs``)."""

    kind = "recipe error"

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


class DataError(BadInputError):
    """A data file is missing or malformed; the message names the file."""

    kind = "data error"


class ModelError(BadInputError):
    """A model cannot be loaded or a layer cannot be handled; the message names it."""

    kind = "model error"


class WorkError(SlimkitError):
    """The work itself failed (not its input): the CLI exits 1."""


class NonFiniteError(WorkError):
    """Training met a NaN or infinite loss, gradient or weight.

    ``where`` says when (``epoch 2/5, batch 7/23``) and ``layer`` names the first parameter
    found non-finite, when known; the recipe runner adds the step with :meth:`in_step`.
    """

    def __init__(self, message: str, where: str = "", layer: str | None = None, step: str = ""):
        self.message, self.where, self.layer, self.step = message, where, layer, step
        super().__init__(": ".join(p for p in (step, where, message) if p))

    def in_step(self, step: str) -> NonFiniteError:
        """The same error named by the recipe step it happened in (``steps[0] (train)``)."""
        return NonFiniteError(self.message, self.where, self.layer, step)
