"""The structured tests share model definitions through ``test_structured`` (this folder): put it on the path
for the tests in the subfolders (``graph/``, ``llm/``), as the root conftest does for ``tests/``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "llm"))
