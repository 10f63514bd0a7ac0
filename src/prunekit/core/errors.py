"""Errors that prunekit raises for bad input.

Every error names the problem and the fix. They subclass ``ValueError`` (or ``FileNotFoundError`` /
``FileExistsError`` where that is what happened) so that callers can catch them broadly.
"""

from __future__ import annotations


class PrunekitError(Exception):
    """Base class of every error prunekit raises on purpose."""


class ConfigError(PrunekitError, ValueError):
    """A setting is invalid (sparsity, pattern, method, recipe key...).

    ``problems`` lists ``(dotted location, message)`` pairs when the error comes from validating a config.
    """

    problems: tuple[tuple[str, str], ...] = ()


class CalibrationError(PrunekitError, ValueError):
    """Calibration or evaluation data is missing, empty or too short."""


class ModelLoadError(PrunekitError, ValueError):
    """A model could not be found or read."""


class TargetError(PrunekitError, ValueError):
    """No layer to prune, or a name pattern that matches nothing."""


class NonFiniteError(PrunekitError, ValueError):
    """NaN or Inf found in a layer's weights or inputs."""


class OutputError(PrunekitError, OSError):
    """The output location exists, is not empty, or cannot be written."""


class NumericalError(PrunekitError, ArithmeticError):
    """A computation cannot proceed (e.g. a Hessian that stays singular after dampening)."""


class UntraceableModuleError(PrunekitError, ValueError):
    """A model (or one of its submodules) cannot be traced for structural pruning.

    ``module_name`` is the innermost submodule that was running (``None``: outside all of them) and
    ``progress`` how many graph nodes were traced before the failure."""

    module_name: str | None = None
    progress: int = 0


class StructuralPruningError(PrunekitError, ValueError):
    """A structural pruning plan cannot be applied (or its result does not run).

    ``module_name`` names the module where the pruned model departs from the plan, when known."""

    module_name: str | None = None
