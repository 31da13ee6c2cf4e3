"""Shared pieces of the paper-reproduction scripts: methods, the tuning protocol, result files.

Every script in ``recipes/paper`` tunes every method with the same budget:

1. a learning-rate sweep over :data:`LR_GRID` (every method; TO at its default α, β), then
2. for TO only, an α × β sweep over :data:`ALPHA_GRID` × :data:`BETA_GRID` at the best
   learning rate of step 1 (the paper-literal form, whose α is a raw rate, gets
   :data:`PAPER_ALPHA_GRID`).

Tuning uses seed 0; the reported numbers use seeds 1 … ``n_seeds`` (fresh data order and,
for networks, fresh initialisation), so the selection and the evaluation do not share noise.
"""

from __future__ import annotations

import inspect
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

try:
    import hf_to  # noqa: F401
except ImportError:  # running from a checkout without ``pip install -e .``
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
# The recipes' shared statistics and training loop (``recipe_metrics``, ``recipe_loop``).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipe_metrics import steps_to_target

from hf_to import TrainableOptimizer, load_optimizer

__all__ = [
    "ALPHA_GRID",
    "BETA_GRID",
    "LR_GRID",
    "METHODS",
    "PAPER_ALPHA_GRID",
    "Method",
    "add_reuse_arguments",
    "estimate_from_state",
    "load_json",
    "load_reused",
    "provenance",
    "run_plan",
    "save_json",
    "steps_to_target",
    "to_defaults",
    "tune",
]

#: One learning-rate grid for every method (SGD needs the top, Adam the bottom of it).
LR_GRID: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
#: Slope rates tried for TO's default (normalised) form.
ALPHA_GRID: tuple[float, ...] = (1e-2, 1e-1, 0.5)
#: Raw slope rates tried for the paper-literal form (α multiplies ‖w‖², so it is smaller).
PAPER_ALPHA_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
#: Intercept rates tried for TO (β = 1 − momentum of the intercept's EMA).
BETA_GRID: tuple[float, ...] = (0.05, 0.1, 0.3)


def provenance() -> dict[str, Any]:
    """What produced a result: hf_to's commit, whether its sources were modified, TO's defaults."""
    import subprocess

    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return ""

    sig = inspect.signature(TrainableOptimizer.__init__).parameters
    defaults = {k: v.default for k, v in sig.items() if v.default is not inspect.Parameter.empty}
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "hf_to_modified": bool(git("status", "--porcelain", "--", "hf_to")),
        "torch": torch.__version__,
        "to_defaults": {k: v for k, v in defaults.items() if isinstance(v, (int, float, str, bool))},
    }


def to_defaults() -> dict[str, float]:
    """TO's current default α and β, read from the signature (they may change)."""
    sig = inspect.signature(TrainableOptimizer.__init__).parameters
    return {"alpha": sig["alpha"].default, "beta": sig["beta"].default}


@dataclass(frozen=True)
class Method:
    """An optimizer under test: a display label, how to build it, whether α/β are tuned."""

    label: str
    build: Callable[..., torch.optim.Optimizer]
    trainable: bool = False  # a TO variant: has α, β and an estimator state
    paper: bool = False  # paper-literal form (raw α, no preconditioner)
    estimator: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _to(name: str) -> Callable[..., torch.optim.Optimizer]:
    ctor = load_optimizer(name)

    def build(params: Iterable, lr: float, alpha: float | None = None, beta: float | None = None, **kw: Any):
        kwargs = {k: v for k, v in (("alpha", alpha), ("beta", beta)) if v is not None}
        return ctor(params, lr=lr, **kwargs, **kw)

    return build


def _sgd(params: Iterable, lr: float, **_: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr)


def _momentum(params: Iterable, lr: float, **_: Any) -> torch.optim.Optimizer:
    # Heavy ball with the usual 0.9; its effective step is lr / (1 − 0.9).
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def _adam(params: Iterable, lr: float, **_: Any) -> torch.optim.Optimizer:
    # Weight decay is in the objective (convex) or absent (digits): Adam ≡ AdamW here.
    return torch.optim.Adam(params, lr=lr)


def _methods() -> dict[str, Method]:
    out = {
        "sgd": Method("SGD", _sgd),
        "momentum": Method("SGD+momentum(0.9)", _momentum),
        "adam": Method("Adam", _adam),
    }
    for est, short in (("full", "full"), ("diagonal", "diag"), ("rank_one", "rank-1")):
        out[f"to_{est}"] = Method(f"TO-{short}", _to(f"to_{est}"), trainable=True, estimator=est)
        out[f"to_paper_{est}"] = Method(
            f"TO-{short} (paper)", _to(f"to_paper_{est}"), trainable=True, paper=True, estimator=est
        )
    # A ≡ 0: the estimator is EMA momentum; with the Adam preconditioner it is Adam with b₀ = g₀.
    out["to_none"] = Method("EMA (TO, A=0)", _to("to_none"), trainable=True, estimator="none")
    out["to_paper_none"] = Method(
        "EMA (paper, A=0)", _to("to_paper_none"), trainable=True, paper=True, estimator="none"
    )
    return out


#: All methods by key; each script picks the subset it runs.
METHODS: dict[str, Method] = _methods()


def estimate_from_state(opt: torch.optim.Optimizer, p: torch.Tensor, w_before: torch.Tensor) -> torch.Tensor:
    r"""TO's gradient estimate :math:`\hat G_t = A_{t+1} w_t + b_{t+1}` read back after a step.

    ``w_before`` is :math:`w_t`, the weights before the step; the result is flat.
    """
    state = opt.state[p]
    w = w_before.reshape(-1).to(state["b"].dtype)
    b = state["b"].reshape(-1)
    if "A" in state:
        return state["A"] @ w + b
    if "a" in state:
        return state["a"].reshape(-1) * w + b
    if "u" in state:
        return state["u"].reshape(-1) * torch.dot(state["v"].reshape(-1), w) + b
    return b.clone()


def _score(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def tune(
    method_key: str,
    run: Callable[[dict[str, float]], float],
    *,
    lr_grid: Sequence[float] = LR_GRID,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Pick the hyperparameters of ``method_key`` minimising ``run(hparams)`` (seed 0).

    Returns the best hyperparameters and every trial (``{"lr", "alpha", "beta", "score"}``).
    """
    method = METHODS[method_key]
    base = to_defaults() if method.trainable else {}
    trials: list[dict[str, float]] = []

    def trial(hp: dict[str, float]) -> float:
        score = _score(run(hp))
        trials.append({**hp, "score": score})
        log(f"  {method_key:18s} {hp} -> {score:.4g}")
        return score

    best_lr = min(lr_grid, key=lambda lr: trial({"lr": lr, **base}))
    best = {"lr": best_lr, **base}
    if method.trainable and method.estimator != "none":
        alphas = PAPER_ALPHA_GRID if method.paper else ALPHA_GRID
        grid = [{"lr": best_lr, "alpha": a, "beta": b} for a in alphas for b in BETA_GRID]
    elif method.trainable:  # EMA: only β matters
        grid = [{"lr": best_lr, "alpha": base["alpha"], "beta": b} for b in BETA_GRID]
    else:
        grid = []
    done = {(t["lr"], t.get("alpha"), t.get("beta")): t["score"] for t in trials}
    best_score = done[(best_lr, base.get("alpha"), base.get("beta"))]
    for hp in grid:
        key = (hp["lr"], hp["alpha"], hp["beta"])
        score = done[key] if key in done else trial(hp)
        if score < best_score:
            best, best_score = hp, score
    return best, trials


def save_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=float) + "\n")


def load_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def add_reuse_arguments(ap: Any, prefix: str) -> None:
    """``--reuse DIR`` (earlier ``<prefix>_<name>.json`` files) and ``--retune METHOD ...``."""
    ap.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help=f"directory of earlier {prefix}_<name>.json: reuse their tuning (same steps), rerun the seeds",
    )
    ap.add_argument("--retune", nargs="*", default=[], help="with --reuse: methods to tune afresh")


def run_plan(args: Any, smoke_steps: int) -> tuple[int, list[int], tuple[float, ...] | None]:
    """``(steps, evaluation seeds, learning-rate grid or None for LR_GRID)`` of a run or a smoke run."""
    if args.smoke:
        return smoke_steps, [1], (1e-2, 1e-1)
    return args.steps, list(range(1, args.seeds + 1)), None


def load_reused(directory: Path | None, names: Iterable[str], prefix: str, key: str) -> dict[str, Any]:
    """The ``key``/``name`` sections of the earlier ``<prefix>_<name>.json`` in ``directory``."""
    reused: dict[str, Any] = {}
    for name in names if directory else []:
        path = directory / f"{prefix}_{name}.json"
        if path.exists():
            reused[name] = load_json(path)[key][name]
    return reused
