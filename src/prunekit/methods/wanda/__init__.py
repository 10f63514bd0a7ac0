"""Wanda (Sun et al. 2023): ``|W_ij| * ||X_j||_2``, compared within each output row."""

from prunekit.methods.wanda.method import Wanda
from prunekit.methods.wanda.scores import wanda_scores

__all__ = ["Wanda", "wanda_scores"]
