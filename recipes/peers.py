"""The optimizers users pick instead of TO, by name: one registry for the study and compare.py.

Each peer is built from its package's defaults with only the learning rate (and weight
decay) set, the way a user switches optimizer.  ``lr_scale`` is the ratio of the peer's
documented default learning rate to AdamW's (1e-3), used to centre its learning-rate grid
(Lion's authors advise a 3-10x smaller rate than AdamW's; MARS and schedule-free AdamW
document larger ones).

=========== =================================== ===================== ========
name        class                               package               lr_scale
=========== =================================== ===================== ========
adamw       ``torch.optim.AdamW(fused=True)``   torch                 1
adan        ``Adan``                            pytorch-optimizer     1
mars        ``MARS`` (``mars_type="adamw"``)    pytorch-optimizer     3
lion        ``Lion``                            pytorch-optimizer     0.1
sf_adamw    ``AdamWScheduleFree``               schedulefree          2.5
nadamw      ``torch.optim.NAdam``               torch                 2
            (``decoupled_weight_decay=True``)
ademamix    ``AdEMAMix``                        pytorch-optimizer     1
soap        ``SOAP``                            pytorch-optimizer     3
muon        ``Muon``                            pytorch-optimizer     20
to          ``hf_to.TrainableOptimizer``        hf_to                 1
=========== =================================== ===================== ========

MARS optimises 1-d tensors (norm weights, biases) with its own AdamW at ``lr_1d`` and
``weight_decay_1d=0.1`` by default; here both follow ``lr`` and ``weight_decay`` so that one
learning rate governs the whole model, as for the others.  Schedule-free AdamW replaces the
learning-rate schedule (the caller must not add one) and needs ``optimizer.train()`` /
``optimizer.eval()`` around evaluation (:func:`needs_train_eval`).  Muon orthogonalises the
updates of matrices and steps every other tensor with its own AdamW, at ``adamw_lr`` (3e-4 by
default beside its 0.02): its groups are split by dimension (:func:`muon_groups`), and
``adamw_lr`` follows ``lr`` at that documented ratio, so that one learning rate governs the
whole model as for MARS.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "MUON_ADAMW_RATIO",
    "PEERS",
    "Peer",
    "PeerError",
    "build_optimizer",
    "muon_groups",
    "needs_train_eval",
    "optimizer_kwargs",
    "peer",
]


#: Muon's documented AdamW rate over its Muon rate (3e-4 / 0.02).
MUON_ADAMW_RATIO = 3e-4 / 0.02


class PeerError(ValueError):
    """An unknown peer, or one whose package is not installed (the message says how to install it)."""


@dataclass(frozen=True)
class Peer:
    name: str
    module: str  #: the module that holds the class
    cls: str
    pip: str  #: what to pip install
    lr_scale: float  #: documented default lr / AdamW's
    defaults: tuple[tuple[str, Any], ...] = ()
    schedule_free: bool = False
    #: Turns a parameter list (or a list of groups, as the Trainer passes) into the groups the
    #: class requires; ``None``: passed on as given.
    groups: Callable[[list[Any]], list[dict[str, Any]]] | None = None

    def load(self) -> type[torch.optim.Optimizer]:
        """The optimizer's class; with ``groups``, a subclass that splits what it is given first
        (a class, not a function: the Trainer calls a non-class ``optimizer_cls`` as a factory)."""
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            raise PeerError(
                f"optimizer {self.name!r} needs the package {self.pip!r}: pip install {self.pip} ({exc})"
            ) from None
        cls = getattr(module, self.cls)
        if self.groups is None:
            return cls
        split = self.groups

        def __init__(opt: torch.optim.Optimizer, params: Iterable[Any], **kwargs: Any) -> None:
            cls.__init__(opt, split(list(params)), **kwargs)

        return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": __name__})


def muon_groups(params: list[Any]) -> list[dict[str, Any]]:
    """Muon's groups: each given group (or the plain list) split into its matrices
    (``use_muon=True``) and its other tensors (``use_muon=False``, Muon's AdamW; a group's own
    ``lr`` becomes ``lr`` × :data:`MUON_ADAMW_RATIO` there).  By shape only: a trained embedding
    or LM head goes to Muon, where Muon's authors put it in the AdamW group (the study's full
    fine-tuning freezes SmolLM2's tied embeddings, so no such tensor reaches it)."""
    given = params if params and isinstance(params[0], dict) else [{"params": params}]
    out = []
    for group in given:
        tensors = list(group["params"])
        matrices, rest = [p for p in tensors if p.ndim >= 2], [p for p in tensors if p.ndim < 2]
        if matrices:
            out.append({**group, "params": matrices, "use_muon": True})
        if rest:
            adamw = {**group, "params": rest, "use_muon": False}
            if "lr" in group:
                adamw["lr"] = group["lr"] * MUON_ADAMW_RATIO
            out.append(adamw)
    return out


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer("adamw", "torch.optim", "AdamW", "torch", 1.0, (("fused", True),)),
        Peer("adan", "pytorch_optimizer", "Adan", "pytorch-optimizer", 1.0),
        Peer("mars", "pytorch_optimizer", "MARS", "pytorch-optimizer", 3.0, (("mars_type", "adamw"),)),
        Peer("lion", "pytorch_optimizer", "Lion", "pytorch-optimizer", 0.1),
        Peer("sf_adamw", "schedulefree", "AdamWScheduleFree", "schedulefree", 2.5, schedule_free=True),
        # AdamW with Nesterov momentum (torch's default lr 2e-3); the peer for TO's look-ahead.
        Peer("nadamw", "torch.optim", "NAdam", "torch", 2.0, (("decoupled_weight_decay", True),)),
        # Recent winners of independent optimizer benchmarks (the study runs them on full fine-tuning).
        Peer("ademamix", "pytorch_optimizer", "AdEMAMix", "pytorch-optimizer", 1.0),
        Peer("soap", "pytorch_optimizer", "SOAP", "pytorch-optimizer", 3.0),
        Peer("muon", "pytorch_optimizer", "Muon", "pytorch-optimizer", 20.0, groups=muon_groups),
        Peer("to", "hf_to", "TrainableOptimizer", "hf-to", 1.0),
    )
}


def peer(name: str) -> Peer:
    """The peer called ``name``; :class:`PeerError` listing the known names otherwise."""
    try:
        return PEERS[name]
    except KeyError:
        raise PeerError(f"unknown optimizer {name!r}; known: {', '.join(sorted(PEERS))}") from None


def build_optimizer(
    name: str,
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    lr: float,
    *,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Construct peer ``name`` at ``lr`` with its package defaults, overridden by ``kwargs``."""
    cls: Callable[..., torch.optim.Optimizer] = peer(name).load()
    return cls(params, **optimizer_kwargs(name, lr, weight_decay=weight_decay, warmup_steps=warmup_steps, **kwargs))


def optimizer_kwargs(
    name: str, lr: float, *, weight_decay: float = 0.0, warmup_steps: int = 0, **kwargs: Any
) -> dict[str, Any]:
    """The keywords peer ``name`` is built with: its defaults, ``lr``, ``weight_decay`` (MARS's 1-d
    rate and decay follow them), schedule-free AdamW's ``warmup_steps``, then ``kwargs``."""
    spec = peer(name)
    options = {**dict(spec.defaults), "lr": lr, "weight_decay": weight_decay, **kwargs}
    if name == "mars":
        options.setdefault("lr_1d", options["lr"])
        options.setdefault("weight_decay_1d", options["weight_decay"])
    if name == "muon":
        options.setdefault("adamw_lr", options["lr"] * MUON_ADAMW_RATIO)
        options.setdefault("adamw_wd", options["weight_decay"])
    if spec.schedule_free:
        options.setdefault("warmup_steps", warmup_steps)
    return options


def needs_train_eval(optimizer: torch.optim.Optimizer) -> bool:
    """Schedule-free optimizers keep two points: call ``.train()`` before and ``.eval()`` after steps."""
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))
