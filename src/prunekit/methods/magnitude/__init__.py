"""Magnitude pruning (Han et al. 2015): keep the weights of largest ``|W|``; needs no calibration."""

from prunekit.methods.magnitude.method import Magnitude
from prunekit.methods.magnitude.scores import magnitude_scores

__all__ = ["Magnitude", "magnitude_scores"]
