"""What the fine-tuning study runs: its tasks, its learning-rate grid and its optimizer table.

The optimizer table is data, ``configs/study/optimizers.yaml`` (label → peer of ``peers.py``,
keyword overrides, α/β grid; the default's candidates), read here into :class:`Config` objects:
:data:`CONFIGS` (the ``--optimizers`` choices) and :data:`CANDIDATES` (the ``candidates`` phase).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

__all__ = [
    "ALL_CONFIGS",
    "CANDIDATES",
    "CONFIGS",
    "EDGE_EXTENSIONS",
    "GRID",
    "OPTIMIZERS_FILE",
    "TASKS",
    "Config",
    "Task",
    "load_optimizer_table",
]

#: Learning-rate grid, as multiples of a task's base lr (× the peer's lr_scale): four points, since
#: small models take larger rates than the usual defaults.
GRID = (1 / 3, 1.0, 3.0, 9.0)
#: How often the grid may go on past an edge where the best rate sits (per optimizer and task).
EDGE_EXTENSIONS = 2
#: The study's optimizer table.
OPTIMIZERS_FILE = Path(__file__).resolve().parent / "configs" / "study" / "optimizers.yaml"


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    text: str  #: "pydoc" or "code"
    mode: str  #: "lora" or "full"
    base_lr: float  #: AdamW's usual rate for this kind of job (SmolLM2-135M)
    proxy_base_lr: float = 0.0  #: the same for the proxy (small models take larger rates)
    steps: int = 200
    batch: int = 4
    seq: int = 64
    val_blocks: int = 32
    test_blocks: int = 64


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("pydoc_lora", "pydoc", "lora", 3e-4, 3e-3),
        Task("code_lora", "code", "lora", 3e-4, 3e-3),
        Task("pydoc_full", "pydoc", "full", 3e-5, 3e-4),
    )
}


@dataclasses.dataclass(frozen=True)
class Config:
    """An optimizer configuration of the study: a peer name and keyword overrides."""

    label: str
    peer: str
    kwargs: tuple[tuple[str, Any], ...] = ()
    #: α/β/γ grid for TO forms (each a dict of overrides), searched at the best lr.
    extra_grid: tuple[tuple[tuple[str, Any], ...], ...] = ()


def _check_keys(where: str, entry: Any, allowed: set[str], required: set[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a mapping, got {type(entry).__name__}")
    unknown, missing = set(entry) - allowed, required - set(entry)
    if unknown or missing:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    return entry


def load_optimizer_table(path: str | Path = OPTIMIZERS_FILE) -> tuple[dict[str, Config], dict[str, Config]]:
    """``(configs, candidates)`` from the YAML optimizer table; unknown keys or grids raise ValueError.

    A candidate is labelled ``cand_a<alpha>_f<norm_floor>`` and sets both on top of the
    candidates' ``kwargs``.
    """
    import yaml

    table = _check_keys(
        str(path),
        yaml.safe_load(Path(path).read_text(encoding="utf-8")),
        {"grids", "optimizers", "candidates"},
        {"optimizers"},
    )
    grids = {
        name: tuple(tuple(point.items()) for point in points) for name, points in (table.get("grids") or {}).items()
    }
    configs = {}
    for label, entry in table["optimizers"].items():
        entry = _check_keys(f"optimizer {label!r}", entry, {"peer", "kwargs", "grid"}, {"peer"})
        if "grid" in entry and entry["grid"] not in grids:
            raise ValueError(f"optimizer {label!r}: unknown grid {entry['grid']!r}; known: {sorted(grids)}")
        kwargs = tuple((entry.get("kwargs") or {}).items())
        configs[label] = Config(label, entry["peer"], kwargs, grids.get(entry.get("grid"), ()))
    candidates = {}
    if "candidates" in table:
        cand = _check_keys(
            "candidates",
            table["candidates"],
            {"peer", "kwargs", "alpha", "norm_floor"},
            {"peer", "alpha", "norm_floor"},
        )
        for a in cand["alpha"]:
            for f in cand["norm_floor"]:
                label = f"cand_a{a:g}_f{f:g}"
                kwargs = tuple({**(cand.get("kwargs") or {}), "alpha": a, "norm_floor": f}.items())
                candidates[label] = Config(label, cand["peer"], kwargs)
    return configs, candidates


CONFIGS, CANDIDATES = load_optimizer_table()
#: Every label a run record may name.
ALL_CONFIGS: dict[str, Config] = {**CONFIGS, **CANDIDATES}
