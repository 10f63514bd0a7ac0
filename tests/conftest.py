import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny byte-level BPE tokenizer of ``models.tiny_tokenizer`` (tests may define their own)."""
    from models import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def calibration():
    """Six windows of 32 tokens of the tiny tokenizer's text (tests may define their own)."""
    import prunekit
    from models import sample_text, tiny_tokenizer
    from prunekit.calibration.data import tokenize_text

    tokens = tokenize_text(tiny_tokenizer(), sample_text())
    return prunekit.calibration.sample_windows(tokens, nsamples=6, seqlen=32, seed=0)
