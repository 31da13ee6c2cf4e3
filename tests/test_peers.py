"""The peer optimizers of the study and compare.py: built by name, clear errors otherwise."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

import compare
import peers
from recipe_config import RecipeError


@pytest.mark.parametrize("name", sorted(peers.PEERS))
def test_every_peer_builds_and_steps(name):
    p = torch.nn.Parameter(torch.ones(3, 2))
    opt = peers.build_optimizer(name, [p], lr=1e-2, warmup_steps=1)
    if peers.needs_train_eval(opt):
        opt.train()
    for _ in range(2):  # SOAP's first step only sets up its preconditioner, as in its paper's code
        p.grad = torch.ones_like(p)
        opt.step()
    assert not torch.equal(p.detach(), torch.ones(3, 2)), f"{name} did not move the weights"


def test_muon_steps_matrices_with_muon_and_the_rest_with_its_adamw_at_the_documented_ratio():
    w, bias = torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(3))
    opt = peers.build_optimizer("muon", [w, bias], lr=0.02)
    by_flag = {g["use_muon"]: g for g in opt.param_groups}
    assert by_flag[True]["params"] == [w] and by_flag[False]["params"] == [bias]
    assert by_flag[False]["lr"] == pytest.approx(0.02 * peers.MUON_ADAMW_RATIO)
    # the Trainer passes groups (decay / no decay): each is split, its keys kept
    trainer_groups = [{"params": [w], "weight_decay": 0.1}, {"params": [bias], "weight_decay": 0.0}]
    split = peers.muon_groups(trainer_groups)
    assert [(g["use_muon"], g["weight_decay"]) for g in split] == [(True, 0.1), (False, 0.0)]
    with_lr = peers.muon_groups([{"params": [w, bias], "lr": 0.04}])
    assert [(g["use_muon"], g["lr"]) for g in with_lr] == [(True, 0.04), (False, 0.04 * peers.MUON_ADAMW_RATIO)]


@pytest.mark.parametrize("name", sorted(peers.PEERS))
def test_every_peer_loads_as_a_class_that_takes_trainer_groups(name):
    """The Trainer calls a non-class ``optimizer_cls`` as a factory of the model, so compare.py
    must get a class; it builds it from groups with decay / no decay, as here."""
    cls = peers.peer(name).load()
    assert isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)
    w, bias = torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(3))
    groups = [{"params": [w], "weight_decay": 0.01}, {"params": [bias], "weight_decay": 0.0}]
    opt = cls(groups, **peers.optimizer_kwargs(name, 1e-3, warmup_steps=1))
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(w), id(bias)}


def test_unknown_peer_is_named_with_the_known_ones():
    with pytest.raises(peers.PeerError, match=r"unknown optimizer 'adamx'; known: adamw, adan"):
        peers.peer("adamx")


def test_missing_package_says_how_to_install_it(monkeypatch):
    fake = peers.Peer("ghost", "no_such_module_hf_to", "Ghost", "ghost-optimizer", 1.0)
    monkeypatch.setitem(peers.PEERS, "ghost", fake)
    with pytest.raises(peers.PeerError, match=r"needs the package 'ghost-optimizer': pip install ghost-optimizer"):
        peers.build_optimizer("ghost", [torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(RecipeError, match="pip install ghost-optimizer"):
        compare.parse_variant("ghost")


def test_compare_variants_name_peers_and_pass_their_keywords():
    lion = compare.parse_variant("lion_fast=lion:betas=0.95/0.98")
    assert (lion.label, lion.peer, lion.optim_args) == ("lion_fast", "lion", "betas=0.95/0.98")
    assert compare.parse_variant("sf_adamw").optim == "schedule_free_adamw"
    args = type("Args", (), {"learning_rate": 3e-4, "weight_decay": 0.0})()
    cls, kwargs = compare._peer_optimizer(lion, args)
    assert cls.__name__ == "Lion" and kwargs["betas"] == (0.95, 0.98) and kwargs["lr"] == 3e-4
    _mars_cls, mars = compare._peer_optimizer(compare.parse_variant("mars"), args)
    assert mars["lr_1d"] == 3e-4 and mars["weight_decay_1d"] == 0.0 and mars["mars_type"] == "adamw"


def test_compare_refuses_an_unknown_optimizer_listing_peers():
    with pytest.raises(RecipeError, match=r"unknown optimizer 'adamx'.*adan"):
        compare.parse_variant("adamx")
