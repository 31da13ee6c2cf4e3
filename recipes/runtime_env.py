"""Process settings the recipe scripts need before torch and transformers load.

``sft.py`` and ``compare.py`` import this module ahead of transformers, torch and hf_to (it uses
the standard library and PyYAML only).  Imported before torch, it

* sets ``OMP_WAIT_POLICY=PASSIVE`` unless you set it: waiting OpenMP threads sleep instead of
  spinning, so a recipe and another torch job on the same cores do not starve each other
  (libgomp reads the variable once, when torch loads it; see recipes/README.md, "A busy CPU");
* keeps bitsandbytes out unless the command asks for 4-bit loading (QLoRA): transformers
  imports peft, which imports bitsandbytes, whose CPU backend logs a warning about an
  optional kernel at every start.

Imported after torch (in tests, or from another program) it changes nothing.  :data:`EARLY`
records which case applied.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["EARLY", "asks_for_4bit", "prepare"]

_TRUE = ("", "1", "true", "yes", "on")


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of ``--flag value`` / ``--flag=value`` (``""`` for a bare flag), else None."""
    for i, arg in enumerate(argv):
        if arg == flag:
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            return "" if nxt.startswith("--") else nxt
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def asks_for_4bit(argv: Sequence[str], default_config: str | os.PathLike[str] | None = None) -> bool:
    """Whether ``--load_in_4bit`` or the config's ``peft.load_in_4bit`` turns 4-bit loading on.

    When the config cannot be read, the answer is yes (the safe side: bitsandbytes stays
    importable and the argument parser reports the problem)."""
    value = _flag_value(argv, "--load_in_4bit")
    if value is not None:
        return value.lower() in _TRUE
    config = _flag_value(argv, "--config") or default_config
    if not config:
        return False
    try:
        import yaml

        with Path(config).open(encoding="utf-8") as handle:
            raw = yaml.safe_load(handle) or {}
        peft = raw.get("peft") or {}
        return bool(peft.get("load_in_4bit") or raw.get("load_in_4bit"))
    except Exception:  # unreadable config: the parser will say why
        return True


def prepare(argv: Sequence[str] | None = None, default_config: str | os.PathLike[str] | None = None) -> bool:
    """Apply the settings if torch has not loaded yet; returns whether they applied."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not asks_for_4bit(sys.argv[1:] if argv is None else argv, default_config):
        # find_spec() then reports bitsandbytes as absent to transformers, peft and accelerate.
        sys.modules.setdefault("bitsandbytes", None)  # type: ignore[arg-type]
    return True


#: Whether this import came before torch's, so that the settings took effect.
EARLY = prepare()
