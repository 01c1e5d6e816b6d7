"""``Muon`` as a drop-in for ``torch.optim.Muon``: same arguments, defaults and (in float32) update."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import torch.optim._muon as torch_muon
from lightning_spectral.optim import Muon

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
