"""iCBS (Rosenberg et al. 2024): a cheap mask refined by block coordinate descent on the layer's error."""

from prunekit.methods.icbs.method import Icbs, IcbsConfig

__all__ = ["Icbs", "IcbsConfig"]
