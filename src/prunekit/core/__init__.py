"""prunekit.core."""
