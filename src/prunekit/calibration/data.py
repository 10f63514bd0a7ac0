"""Calibration windows: ``n`` windows of ``L`` tokens drawn with a seed from a tokenized text.

As in the Wanda and SparseGPT papers, each window starts at a uniformly random token offset; draw from a
validation text, never from the text you report perplexity on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from prunekit.core.errors import CalibrationError

log = logging.getLogger(__name__)


def read_text(path: str | Path, what: str = "calibration") -> str:
    """Read a UTF-8 text file, refusing a missing or empty one with a clear error."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise CalibrationError(f"{what} file {str(file)!r} not found: pass an existing text file")
    text = file.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise CalibrationError(f"{what} file {str(file)!r} is empty: pass a file with text in it")
    return text


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize a whole text once into a 1-D ``int64`` tensor (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def load_text_tokens(tokenizer: Any, path: str | Path, what: str = "calibration") -> torch.Tensor:
    """Read and tokenize a text file."""
    return tokenize_text(tokenizer, read_text(path, what))


def load_dataset_tokens(
    tokenizer: Any, name: str, config: str | None = None, split: str = "train", field: str = "text"
) -> torch.Tensor:
    """Tokenize a Hugging Face dataset split's text field, joined with blank lines (needs ``datasets``)."""
    try:
        import datasets
    except ImportError:
        raise CalibrationError("calibration from a dataset name needs: pip install 'prunekit[datasets]'") from None
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as exc:
        raise CalibrationError(f"could not load dataset {name!r} ({config}, {split}): {exc}") from None
    if field not in data.column_names:
        raise CalibrationError(f"dataset {name!r} has no field {field!r}; fields: {data.column_names}")
    return tokenize_text(tokenizer, "\n\n".join(t for t in data[field] if t))


def check_window_args(nsamples: int, seqlen: int, max_context: int | None = None) -> None:
    """Validate window count and length against each other and the model's context."""
    if not isinstance(nsamples, int) or nsamples <= 0:
        raise CalibrationError(f"nsamples must be a positive whole number, got {nsamples!r}")
    if not isinstance(seqlen, int) or seqlen <= 0:
        raise CalibrationError(f"seqlen must be a positive whole number, got {seqlen!r}")
    if max_context is not None and seqlen > max_context:
        raise CalibrationError(
            f"seqlen {seqlen} is longer than the model's context of {max_context} tokens: use --seqlen "
            f"{max_context} or less"
        )


def sample_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Draw ``nsamples`` windows of ``seqlen`` tokens at random offsets (seeded) -> ``(nsamples, seqlen)``.

    The text must hold at least ``nsamples * seqlen`` tokens, so that windows need not overlap much.
    """
    check_window_args(nsamples, seqlen)
    total = int(tokens.numel())
    if total < nsamples * seqlen:
        raise CalibrationError(
            f"calibration text has {total} tokens, fewer than nsamples x seqlen = {nsamples} x {seqlen} = "
            f"{nsamples * seqlen}: use a longer text or fewer/shorter windows"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen + 1, (nsamples,), generator=generator)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def model_max_context(config: Any) -> int | None:
    """The longest sequence a model's config allows, where it says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def calibration_windows(
    tokenizer: Any,
    path: str | Path,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    max_context: int | None = None,
) -> torch.Tensor:
    """``(nsamples, seqlen)`` token windows drawn with ``seed`` from a text file."""
    check_window_args(nsamples, seqlen, max_context)
    return sample_windows(load_text_tokens(tokenizer, path), nsamples, seqlen, seed)
