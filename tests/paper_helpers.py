"""Import the scripts of ``recipes/paper`` (they import each other as top-level modules)."""

from __future__ import annotations

import sys
from pathlib import Path

PAPER_DIR = Path(__file__).resolve().parents[1] / "recipes" / "paper"
if str(PAPER_DIR) not in sys.path:
    sys.path.insert(0, str(PAPER_DIR))

__all__ = ["PAPER_DIR"]
