"""Least-squares reconstruction: refit the weights a pruning keeps to the dense layer's output."""

from prunekit.reconstruction.least_squares import (
    damped,
    least_squares_refit,
    reconstruction_error,
    refit_kept_weights,
    ridge,
)

__all__ = ["damped", "least_squares_refit", "reconstruction_error", "refit_kept_weights", "ridge"]
