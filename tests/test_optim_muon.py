"""``Muon`` as a drop-in for ``torch.optim.Muon``: same arguments, defaults and (in float32) update."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

import torch.optim._muon as torch_muon
from lightning_spectral.optim import Muon, torch_muon_state_dict

TORCH_ARGS = ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps", "ns_steps", "adjust_lr_fn")


def test_signature_matches_torch_optim_muon():
    """torch's arguments in torch's order, with torch's defaults (``ns_coefficients=None`` means Jordan's)."""
    ours = inspect.signature(Muon).parameters
    theirs = inspect.signature(torch.optim.Muon).parameters
    assert list(ours)[: len(theirs)] == list(theirs) == ["params", *TORCH_ARGS]
    for name in TORCH_ARGS:
        if name == "ns_coefficients":
            assert ours[name].default is None and theirs[name].default == (3.4445, -4.775, 2.0315)
        else:
            assert ours[name].default == theirs[name].default, name
    assert all(ours[n].kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD)
               for n in list(ours)[len(theirs):])


def float32_newton_schulz():
    """torch's own ``_zeropower_via_newtonschulz`` with its one cast to bfloat16 replaced by a copy:
    the same arithmetic in the input's dtype (torch has no float32 path of its own)."""
    source = inspect.getsource(torch_muon._zeropower_via_newtonschulz)
    assert source.count("grad.bfloat16()") == 1, "torch's Newton–Schulz changed: update this test"
    namespace = dict(vars(torch_muon))
    exec(source.replace("grad.bfloat16()", "grad.clone()"), namespace)
    return namespace["_zeropower_via_newtonschulz"]


def run(opt_cls, W0, grads, **kwargs):
    p = nn.Parameter(W0.clone())
    opt = opt_cls([p], **kwargs)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


CASES = [
    dict(),  # every default: lr 1e-3, weight decay 0.1, momentum 0.95, Nesterov, Jordan, 5 steps
    dict(lr=0.02, weight_decay=0.0, momentum=0.9, nesterov=False),
    dict(lr=0.05, adjust_lr_fn="match_rms_adamw", ns_steps=3),
    dict(lr=0.05, adjust_lr_fn="spectral_unclamped", eps=1e-5),
    dict(lr=0.05, ns_coefficients=(3.4445, -4.7750, 2.0315), adjust_lr_fn="original"),
]


@pytest.mark.parametrize("shape", [(32, 32), (48, 20), (20, 48)])
@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "defaults")
def test_float32_update_equals_torch_optim_muon(monkeypatch, shape, kwargs):
    """Four steps from the same weights and gradients, Newton–Schulz in float32 on both sides: the
    weights agree to float32 round-off (≤ 2.4e-7 measured, against ~1e-3 with torch's bfloat16)."""
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", float32_newton_schulz())
    g = torch.Generator().manual_seed(sum(shape))
    W0 = torch.randn(*shape, generator=g)
    grads = [torch.randn(*shape, generator=g) for _ in range(4)]
    ours, opt = run(Muon, W0, grads, ns_dtype="float32", **kwargs)
    ref, ref_opt = run(torch.optim.Muon, W0, grads, **kwargs)
    moved = float((ref - W0).abs().max())
    assert moved > 1e-4
    assert float((ours - ref).abs().max()) <= 1e-6 + 1e-5 * moved, (ours - ref).abs().max()
    p = opt.param_groups[0]["params"][0]
    q = ref_opt.param_groups[0]["params"][0]
    assert set(opt.state[p]) == set(ref_opt.state[q]) == {"momentum_buffer"}
    assert torch.equal(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"])


def test_bfloat16_update_is_close_to_torch_optim_muon():
    """torch's unpatched bfloat16 iteration against ours in bfloat16: bfloat16 accuracy (8 bits)."""
    g = torch.Generator().manual_seed(3)
    W0, grads = torch.randn(24, 40, generator=g), [torch.randn(24, 40, generator=g) for _ in range(2)]
    ours, _ = run(Muon, W0, grads, lr=0.02, ns_dtype="bfloat16")
    ref, _ = run(torch.optim.Muon, W0, grads, lr=0.02)
    step_ours, step_ref = ours - W0, ref - W0
    assert torch.linalg.matrix_norm(step_ours - step_ref) <= 2e-2 * torch.linalg.matrix_norm(step_ref)


def test_package_names_still_work_and_mean_the_same():
    g = torch.Generator().manual_seed(4)
    W0, grads = torch.randn(16, 24, generator=g), [torch.randn(16, 24, generator=g) for _ in range(2)]
    a, _ = run(Muon, W0, grads, lr=0.02, ns_schedule="jordan", adjust_lr="spectral", ns_dtype="float32")
    b, _ = run(Muon, W0, grads, lr=0.02, ns_coefficients=(3.4445, -4.775, 2.0315),
               adjust_lr_fn="spectral_unclamped", ns_dtype="float32")
    assert torch.equal(a, b)
    c, opt = run(Muon, W0, grads, lr=0.02, ns_schedule="polar_express", ns_steps=8, ns_dtype="float32")
    assert opt.param_groups[0]["ns_schedule"] == "polar_express" and not torch.equal(a, c)


@pytest.mark.parametrize("kwargs, match", [
    (dict(adjust_lr_fn="spectral"), "Adjust learning rate function spectral is not supported"),
    (dict(adjust_lr_fn="original", adjust_lr="spectral"), "disagree"),
    (dict(ns_coefficients=(3.0, -3.0)), "three finite numbers"),
    (dict(ns_coefficients=(3.0, float("nan"), 1.2)), "three finite numbers"),
    (dict(ns_coefficients=(3.4445, -4.775, 2.0315), ns_schedule="polar_express"), "disagree"),
    (dict(eps=0.0), "eps must be a positive"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Muon([nn.Parameter(torch.randn(4, 4))], **kwargs)


def test_vectors_take_the_fallback_where_torch_refuses_them():
    model = nn.Linear(6, 4)
    with pytest.raises(ValueError, match="2D"):
        torch.optim.Muon(model.parameters())
    opt = Muon(model.parameters())
    assert [(g["matrix"], len(g["params"])) for g in opt.param_groups] == [(True, 1), (False, 1)]


def test_state_saved_without_eps_still_steps():
    """A checkpoint written before ``eps`` was a group key loads and steps (eps defaults to 1e-7)."""
    p = nn.Parameter(torch.randn(8, 8))
    opt = Muon([p], lr=0.02)
    p.grad = torch.randn(8, 8)
    opt.step()
    state = opt.state_dict()
    del state["param_groups"][0]["eps"]
    opt2 = Muon([p], lr=0.02)
    opt2.load_state_dict(state)
    opt2.step()
    assert torch.isfinite(p).all()


# -- checkpoints moved between torch.optim.Muon and ours, both ways --------------------------------------
def _continue_side_by_side(ours, ours_params, theirs, their_params, grads):
    """The same gradients into both optimizers: the largest weight difference after each step."""
    worst = 0.0
    for g in grads:
        for params, opt in ((ours_params, ours), (their_params, theirs)):
            for p, gp in zip(params, g):
                p.grad = gp.clone()
            opt.step()
        worst = max(worst, max(float((p - q).detach().abs().max()) for p, q in zip(ours_params, their_params)))
    return worst


def _matrices_and_grads(seed, shapes=((24, 16), (16, 24)), steps=6):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(*s, generator=g) for s in shapes]
    grads = [[torch.randn(*s, generator=g) for s in shapes] for _ in range(steps)]
    return weights, grads


@pytest.mark.parametrize("settings", [dict(adjust_lr_fn="match_rms_adamw", ns_coefficients=(3.4, -4.7, 2.0)),
                                      dict(adjust_lr_fn="spectral_unclamped", nesterov=False, momentum=0.9)])
def test_torch_muon_state_dict_loads_into_ours_and_steps_the_same(monkeypatch, settings):
    """torch.optim.Muon trains 3 steps; ours (built with other settings) loads its state dict and
    both go on with the same gradients: ours takes torch's settings and momentum, and the weights
    agree to float32 round-off (torch's Newton–Schulz in float32, as above)."""
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", float32_newton_schulz())
    weights, grads = _matrices_and_grads(5)
    theirs_p = [nn.Parameter(w.clone()) for w in weights]
    theirs = torch.optim.Muon(theirs_p, lr=0.02, weight_decay=0.05, **settings)
    for g in grads[:3]:
        for p, gp in zip(theirs_p, g):
            p.grad = gp.clone()
        theirs.step()
    ours_p = [nn.Parameter(p.detach().clone()) for p in theirs_p]
    ours = Muon(ours_p, lr=0.5, weight_decay=0.0, ns_dtype="float32")
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))  # (torch's load keeps the tensors it is given)
    assert ours.param_groups[0]["lr"] == 0.02 and ours.param_groups[0]["adjust_lr_fn"] == settings["adjust_lr_fn"]
    assert _continue_side_by_side(ours, ours_p, theirs, theirs_p, grads[3:]) <= 1e-6


@pytest.mark.parametrize("settings", [dict(adjust_lr="spectral"), dict(adjust_lr="none", ns_coefficients=(3.4, -4.7, 2.0)),
                                      dict(adjust_lr_fn="match_rms_adamw", nesterov=False)])
def test_our_state_dict_loads_into_torch_muon_and_steps_the_same(monkeypatch, settings):
    """The other way: ours trains 3 steps (matrices, and a bias on the fallback), then
    torch.optim.Muon, built on the same matrices with its defaults, loads
    ``torch_muon_state_dict(ours)`` (or, with no fallback group, ``ours.state_dict()`` itself) and
    both go on: equal steps."""
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", float32_newton_schulz())
    weights, grads = _matrices_and_grads(6)
    bias = nn.Parameter(torch.zeros(24))
    ours_p = [nn.Parameter(w.clone()) for w in weights]
    ours = Muon([*ours_p, bias], lr=0.03, ns_dtype="float32", **settings)
    for g in grads[:3]:
        for p, gp in zip(ours_p, g):
            p.grad = gp.clone()
        bias.grad = torch.ones(24)
        ours.step()
    theirs_p = [nn.Parameter(p.detach().clone()) for p in ours_p]
    theirs = torch.optim.Muon(theirs_p)
    with pytest.raises(ValueError, match="different number of parameter groups"):
        theirs.load_state_dict(ours.state_dict())  # torch's own refusal: the fallback group
    theirs.load_state_dict(copy.deepcopy(torch_muon_state_dict(ours)))
    bias.grad = None
    assert _continue_side_by_side(ours, ours_p, theirs, theirs_p, grads[3:]) <= 1e-6
    # a Muon of matrices only: its own state dict loads into torch's as it is
    only = Muon([nn.Parameter(p.detach().clone()) for p in ours_p], lr=0.03, ns_dtype="float32", **settings)
    torch.optim.Muon([nn.Parameter(p.detach().clone()) for p in ours_p]).load_state_dict(only.state_dict())


def test_what_torch_muon_cannot_continue_is_named():
    conv = nn.Parameter(torch.randn(4, 3, 3, 3))
    opt = Muon([{"params": [nn.Parameter(torch.randn(6, 4))], "name": "hidden"}, {"params": [conv]}],
               ns_schedule="polar_express", ns_steps=8)
    with pytest.raises(ValueError, match=r"param group hidden has ns_schedule='polar_express'.*shape \(4, 3, 3, 3\)"):
        torch_muon_state_dict(opt)
    ours = Muon([nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6))])
    with pytest.raises(ValueError, match="1 param group.*this optimizer 2.*only its 2-D matrices"):
        ours.load_state_dict(torch.optim.Muon([nn.Parameter(torch.randn(6, 4))]).state_dict())
