"""Process settings the recipe scripts need before torch and transformers load.

``sft.py`` and ``compare.py`` import this module ahead of transformers, torch and hf_to (it uses
the standard library and PyYAML only).  Imported before torch, it

* sets ``OMP_WAIT_POLICY=PASSIVE`` unless you set it: waiting OpenMP threads sleep instead of
  spinning, so a recipe and another torch job on the same cores do not starve each other
  (libgomp reads the variable once, when torch loads it; see recipes/README.md, "A busy CPU");
* keeps bitsandbytes out unless the command asks for 4-bit loading (QLoRA) or a bitsandbytes
  optimizer: transformers imports peft, which imports bitsandbytes, whose CPU backend logs a
  warning about an optional kernel at every start.

Imported after torch (in tests, or from another program) it changes nothing.  :data:`EARLY`
records which case applied.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["EARLY", "needs_bitsandbytes", "prepare"]

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


#: Substrings of the transformers optimizer names that run on bitsandbytes (adamw_bnb_8bit, paged_adamw, lion_8bit, ...).
_BNB_OPTIM_MARKERS = ("bnb", "8bit", "paged")


def _values_after(argv: Sequence[str], flag: str) -> list[str]:
    """Every value following ``flag`` up to the next option (``--variants a b``), or its ``=value``."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg.startswith(flag + "="):
            out.append(arg.split("=", 1)[1])
        elif arg == flag:
            for value in argv[i + 1 :]:
                if value.startswith("--"):
                    break
                out.append(value)
    return out


def needs_bitsandbytes(argv: Sequence[str], default_config: str | os.PathLike[str] | None = None) -> bool:
    """Whether the command asks for 4-bit loading (``--load_in_4bit``, ``peft.load_in_4bit``) or
    a bitsandbytes optimizer (``--optim``, ``optim:``, a ``compare.py`` variant such as
    ``adamw_bnb_8bit``).

    When the config cannot be read, the answer is yes (the safe side: bitsandbytes stays
    importable and the argument parser reports the problem)."""
    optims = _values_after(argv, "--optim") + _values_after(argv, "--variants")
    config = _flag_value(argv, "--config") or default_config
    four_bit = _flag_value(argv, "--load_in_4bit")
    if config:
        try:
            import yaml

            with Path(config).open(encoding="utf-8") as handle:
                raw = yaml.safe_load(handle) or {}
            peft = raw.get("peft") or {}
            if four_bit is None and (peft.get("load_in_4bit") or raw.get("load_in_4bit")):
                return True
            optims += [str(raw.get("optim", ""))] + [str(v) for v in (raw.get("compare") or {}).get("variants", [])]
        except Exception:  # unreadable config: the parser will say why
            return True
    if four_bit is not None and four_bit.lower() in _TRUE:
        return True
    return any(marker in optim.lower() for optim in optims for marker in _BNB_OPTIM_MARKERS)


def prepare(argv: Sequence[str] | None = None, default_config: str | os.PathLike[str] | None = None) -> bool:
    """Apply the settings if torch has not loaded yet; returns whether they applied."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not needs_bitsandbytes(sys.argv[1:] if argv is None else argv, default_config):
        # find_spec() then reports bitsandbytes as absent to transformers, peft and accelerate.
        sys.modules.setdefault("bitsandbytes", None)  # type: ignore[arg-type]
    return True


#: Whether this import came before torch's, so that the settings took effect.
EARLY = prepare()
