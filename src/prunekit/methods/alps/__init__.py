"""ALPS (Meng et al. 2024): the mask and the weights of a layer chosen together by ADMM."""

from prunekit.methods.alps.method import Alps, AlpsConfig

__all__ = ["Alps", "AlpsConfig"]
