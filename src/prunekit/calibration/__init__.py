"""Calibration: text windows for statistics, and the block-by-block sequential engine."""

from prunekit.calibration.data import load_text_tokens, sample_windows

__all__ = ["load_text_tokens", "sample_windows"]
