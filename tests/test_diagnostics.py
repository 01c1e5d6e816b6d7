"""Diagnostics against exact answers: SVD, full Hessians, per-example gradients."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import flat_hessian
from torch import nn
from torch.func import functional_call, grad, vmap

import lightning_spectral.diagnostics as diag
from lightning_spectral.diagnostics import (
    GradientNoiseScale,
    HessianVectorProduct,
    MetricsLogger,
    SpectralNormTracker,
    compute_singular_values,
    compute_spectral_norms,
    conv_operator_norm,
    estimate_gradient_noise_scale,
    estimate_sam_sharpness,
    estimate_sharpness,
    grad_sq_norms,
    hessian_top_eigenvalue,
    noise_components,
    power_iteration,
    stable_rank,
)


def mse_loss_fn(model, x, y):
    return F.mse_loss(model(x), y)


def ce_loss_fn(model, x, y):
    return F.cross_entropy(model(x), y)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ----------------------------------------------------------------------------- spectral norms


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, stride=2, padding=1, bias=False),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 10),
        nn.Linear(10, 10),
    )


def test_spectral_norms_match_svd_linear_and_conv():
    model = _conv_net()
    exact = {n: float(torch.linalg.svdvals(m.weight.detach().reshape(m.weight.shape[0], -1))[0])
             for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert set(exact) == {"0", "2", "4", "5"}
    norms = compute_spectral_norms(model)
    tracked = SpectralNormTracker(max_iter=2000, tol=1e-9)(model)
    for name, sigma in exact.items():
        assert rel(norms[name], sigma) < 1e-5
        assert rel(tracked[name], sigma) < 1e-3
    assert list(compute_spectral_norms(model, max_layers=2)) == ["0", "2"]
    spectra = compute_singular_values(model)
    assert all(rel(float(spectra[n][0]), exact[n]) < 1e-6 for n in exact)


@pytest.mark.parametrize("gap", [0.5, 0.99, 1.0])
def test_power_iteration_hard_spectra(gap):
    """Well separated, nearly degenerate and exactly degenerate top pairs, plus a rank-deficient matrix."""
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(30, 30, generator=g))
    v, _ = torch.linalg.qr(torch.randn(20, 20, generator=g))
    s = torch.tensor([3.0, 3.0 * gap, 1.0, 0.5] + [0.0] * 16)  # rank 4
    w = u[:, :20] @ torch.diag(s) @ v.T
    sigma, _, _ = power_iteration(w, max_iter=5000, tol=1e-10, generator=g)
    assert rel(float(sigma), 3.0) < 1e-3
    sigma_scaled, _, _ = power_iteration(-2.5 * w, max_iter=5000, tol=1e-10, generator=g)
    assert rel(float(sigma_scaled), 7.5) < 1e-3


def test_tracker_warm_start_and_state():
    model = nn.Linear(40, 30)
    tracker = SpectralNormTracker(max_iter=2000, tol=1e-9)
    tracker(model)
    with torch.no_grad():
        model.weight.add_(1e-3 * torch.randn_like(model.weight))
    warm = SpectralNormTracker(max_iter=2)  # two rounds from the persistent vector
    warm.load_state_dict(tracker.state_dict())
    exact = float(torch.linalg.matrix_norm(model.weight.detach(), ord=2))
    assert rel(warm(model)[""], exact) < 1e-3
    cold = SpectralNormTracker(max_iter=2)(model)[""]
    assert rel(cold, exact) > rel(warm(model)[""], exact)


def _tiny_gpt() -> nn.Module:
    from lightning_spectral.models import GPT

    torch.manual_seed(0)
    return GPT(vocab_size=11, block_size=8, n_layer=2, n_head=4, n_embd=16)  # head_dim 4


def _head_blocks_by_slicing(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each head's block, sliced by hand: rows h*d:(h+1)*d of Q/K/V, columns of O."""
    d, blocks = model.head_dim, {}
    for i, block in enumerate(model.blocks):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w = getattr(block.attn, proj).weight.detach()
            for h in range(model.n_head):
                blocks[f"blocks.{i}.attn.{proj}/head{h}"] = w[:, h * d:(h + 1) * d] if proj == "o_proj" \
                    else w[h * d:(h + 1) * d]
    return blocks


def test_per_head_norms_match_svd_of_each_block():
    model = _tiny_gpt()
    reference = _head_blocks_by_slicing(model)
    exact = compute_spectral_norms(model, blocks="auto")
    plain = compute_spectral_norms(model)
    assert {k for k in exact if "/head" in k} == set(reference)  # q, k, v, o of both blocks, 4 heads each
    assert {k: v for k, v in exact.items() if "/head" not in k} == plain  # the layer norms are unchanged
    tracker = SpectralNormTracker(max_iter=3000, tol=1e-10, blocks="auto")
    tracked = tracker(model)
    assert set(tracked) == set(exact)
    for key, block in reference.items():
        truth = float(torch.linalg.matrix_norm(block, ord=2))
        assert rel(exact[key], truth) < 1e-6, key
        assert rel(tracked[key], truth) < 1e-4, key
        assert exact[key] <= exact[key.split("/")[0]] * (1 + 1e-6)  # a block's norm is at most its layer's
    # the heads' vectors persist: two rounds from them stay exact
    warm = SpectralNormTracker(max_iter=2, blocks="auto")
    warm.load_state_dict(tracker.state_dict())
    assert tracker.state_dict()["vectors"]["blocks.1.attn.o_proj/head"].shape == (4, 16)
    again = warm(model)
    assert max(rel(again[k], float(torch.linalg.matrix_norm(b, ord=2))) for k, b in reference.items()) < 1e-4
    assert not any("/head" in k for k in SpectralNormTracker()(model))  # default: nothing new


def test_per_head_norms_from_globs():
    model = _tiny_gpt()
    norms = compute_spectral_norms(model, blocks={"*.q_proj": 2, "blocks.0.mlp.fc": 16})
    assert {k.split("/")[0] for k in norms if "/head" in k} == {"blocks.0.attn.q_proj", "blocks.1.attn.q_proj",
                                                             "blocks.0.mlp.fc"}
    fc = model.blocks[0].mlp.fc.weight.detach()  # 64 x 16: four row blocks of 16
    assert [k for k in norms if k.startswith("blocks.0.mlp.fc/")] == [f"blocks.0.mlp.fc/head{h}" for h in range(4)]
    for h in range(4):
        truth = float(torch.linalg.matrix_norm(fc[16 * h:16 * (h + 1)], ord=2))
        assert rel(norms[f"blocks.0.mlp.fc/head{h}"], truth) < 1e-6
    q = model.blocks[1].attn.q_proj.weight.detach()
    assert rel(norms["blocks.1.attn.q_proj/head7"], float(torch.linalg.matrix_norm(q[14:16], ord=2))) < 1e-6


@pytest.mark.parametrize("blocks, match", [
    ({"*.qproj": 4}, r"glob '\*\.qproj' matches no measured layer"),
    ({"*.q_proj": 3}, r"layer 'blocks\.0\.attn\.q_proj': block size 3 does not divide its 16 rows"),
    ({"*.q_proj": 0}, r"blocks\['\*\.q_proj'\] must be a positive int"),
    (4, "blocks must be None, 'auto' or a dict"),
])
def test_per_head_bad_blocks_name_the_problem(blocks, match):
    with pytest.raises(ValueError, match=match):
        compute_spectral_norms(_tiny_gpt(), blocks=blocks)
    with pytest.raises(ValueError, match=match):
        SpectralNormTracker(blocks=blocks)(_tiny_gpt())


def test_per_head_auto_needs_gpt_attention():
    with pytest.raises(ValueError, match="blocks='auto' found no multi-head attention"):
        compute_spectral_norms(nn.Linear(8, 8), blocks="auto")


def _dense_conv_matrix(conv: nn.Conv2d, shape) -> torch.Tensor:
    n = math.prod(shape)
    eye = torch.eye(n).reshape(n, *shape)
    with torch.no_grad():
        return conv._conv_forward(eye, conv.weight, None).reshape(n, -1).T


@pytest.mark.parametrize("stride,padding_mode", [(1, "zeros"), (2, "zeros"), (1, "circular")])
def test_conv_operator_norm_matches_dense_svd(stride, padding_mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=1, padding_mode=padding_mode)
    shape = (3, 6, 6)
    exact = float(torch.linalg.svdvals(_dense_conv_matrix(conv, shape))[0])
    assert rel(conv_operator_norm(conv, shape, max_iter=2000, tol=1e-10), exact) < 1e-3
    kernel = float(torch.linalg.matrix_norm(conv.weight.detach().reshape(4, -1), ord=2))
    assert exact <= 3.0 * kernel * (1 + 1e-6)  # sqrt(k_h k_w) bound


def test_compute_spectral_norms_operator_mode():
    model = _conv_net()
    norms = compute_spectral_norms(model, input_shape=(3, 8, 8))
    assert rel(norms["0"], float(torch.linalg.svdvals(_dense_conv_matrix(model[0], (3, 8, 8)))[0])) < 1e-3
    assert rel(norms["2"], float(torch.linalg.svdvals(_dense_conv_matrix(model[2], (8, 8, 8)))[0])) < 1e-3
    assert norms["4"] == pytest.approx(compute_spectral_norms(model)["4"])


def test_stable_rank():
    w = torch.diag(torch.tensor([2.0, 1.0, 1.0]))
    assert stable_rank(w) == pytest.approx(6.0 / 4.0)
    assert stable_rank(torch.zeros(3, 3)) == 0.0


# ----------------------------------------------------------------------------- sharpness


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_sharpness_matches_full_hessian(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    hess = flat_hessian(model, lambda p: F.cross_entropy(functional_call(model, p, (x,)), y))
    exact = float(torch.linalg.eigvalsh(hess)[-1])
    got = estimate_sharpness(model, ce_loss_fn, x, y, method=method, max_iter=200, tol=1e-8)
    assert rel(got, exact) < 1e-2, (got, exact)


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_sharpness_algebraic_top_when_negative_dominates(method):
    """Power iteration alone would return -5 here; the shifted run must return the algebraic top, 2."""
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([-5.0, 2.0, 1.0, 0.5, -1.0], dtype=torch.float64)) @ q.T
    theta = nn.Parameter(torch.randn(5, dtype=torch.float64))
    hvp = HessianVectorProduct(0.5 * theta @ a @ theta, [theta])
    v0 = torch.randn(5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lam, vec, _ = hessian_top_eigenvalue(hvp, v0, method, max_iter=500, tol=1e-10)
    assert lam == pytest.approx(2.0, rel=1e-3)
    assert abs(float(vec @ a @ vec)) / float(vec @ vec) == pytest.approx(2.0, rel=1e-2)


def test_sam_sharpness_is_the_finite_difference():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    before = [p.detach().clone() for p in model.parameters()]
    loss = mse_loss_fn(model, x, y)
    g = torch.autograd.grad(loss, list(model.parameters()))
    gn = torch.sqrt(sum(t.pow(2).sum() for t in g))
    params = {n: p + 0.1 * t / gn for (n, p), t in zip(model.named_parameters(), g)}
    expected = float((F.mse_loss(functional_call(model, params, (x,)), y) - loss).detach())
    assert estimate_sam_sharpness(model, mse_loss_fn, x, y, epsilon=0.1) == pytest.approx(expected, rel=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ----------------------------------------------------------------------------- gradient noise scale


def test_noise_components_algebra():
    # |G|^2 = 2, tr(Sigma) = 8: E|G_4|^2 = 2 + 8/4 = 4, E|G_16|^2 = 2 + 8/16 = 2.5
    assert noise_components(4.0, 2.5, 4, 16) == pytest.approx((2.0, 8.0))
    with pytest.raises(ValueError, match="b_small < b_big"):
        noise_components(1.0, 1.0, 8, 8)


def test_gns_estimators_unbiased_against_per_example_gradients():
    """Smoothed estimates vs the exact |G|^2 and tr(Sigma) of a finite data set (batches drawn with replacement)."""
    torch.manual_seed(0)
    n, d = 512, 5
    x = torch.randn(n, d, dtype=torch.float64)
    y = (x @ torch.randn(d, 1, dtype=torch.float64)).tanh() + 0.5 * torch.randn(n, 1, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def example_loss(p, xi, yi):
        return F.mse_loss(functional_call(model, p, (xi[None],)), yi[None])

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(n, -1) for g in per_example.values()], dim=1)
    mean = flat.mean(0)
    true_grad_sq = float(mean.pow(2).sum())
    true_trace = float((flat - mean).pow(2).sum(1).mean())

    b, m, reps = 8, 4, 600
    estimator = GradientNoiseScale(decay=0.999)
    gen = torch.Generator().manual_seed(0)
    naive = 0.0
    for _ in range(reps):
        idx = torch.randint(0, n, (m * b,), generator=gen).reshape(m, b)
        small, big = grad_sq_norms(lambda i: mse_loss_fn(model, x[i], y[i]), list(model.parameters()), list(idx))
        estimator.update(small, big, b, m * b)
        naive += big / reps
    assert rel(estimator.grad_sq, true_grad_sq) < 0.1, (estimator.grad_sq, true_grad_sq)
    assert rel(estimator.trace, true_trace) < 0.1, (estimator.trace, true_trace)
    assert rel(estimator.noise_scale, true_trace / true_grad_sq) < 0.15
    assert rel(naive, true_grad_sq) > 0.3  # the plain big-batch norm is biased: the test can tell


def test_gns_ema_state_round_trip_and_one_shot():
    est = GradientNoiseScale(decay=0.9)
    assert math.isnan(est.noise_scale)
    est.update(4.0, 2.5, 4, 16)
    est.update(5.0, 2.0, 4, 16)
    clone = GradientNoiseScale()
    clone.load_state_dict(json.loads(json.dumps(est.state_dict())))
    assert clone.state_dict() == est.state_dict() and clone.noise_scale == est.noise_scale
    with pytest.raises(ValueError, match="decay"):
        GradientNoiseScale(decay=1.0)
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    batches = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(3)]
    value = estimate_gradient_noise_scale(model, ce_loss_fn, *batches)
    assert isinstance(value, float) and (math.isnan(value) or value == value)
    with pytest.raises(ValueError, match="equal sizes"):
        estimate_gradient_noise_scale(model, ce_loss_fn, batches[0], (batches[1][0][:4], batches[1][1][:4]))


# ----------------------------------------------------------------------------- isolation from training


class _BNDropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("eval_mode", [True, False])
def test_diagnostics_leave_grad_buffers_rng_and_mode_untouched(eval_mode):
    torch.manual_seed(0)
    model = _BNDropNet().train()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    ce_loss_fn(model, x, y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    params = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    estimate_sharpness(model, ce_loss_fn, x, y, max_iter=5, eval_mode=eval_mode)
    estimate_gradient_noise_scale(model, ce_loss_fn, (x[:8], y[:8]), (x[8:], y[8:]), eval_mode=eval_mode)
    estimate_sam_sharpness(model, ce_loss_fn, x, y, eval_mode=eval_mode)
    compute_spectral_norms(model, input_shape=(4,))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


def test_diagnostics_do_not_import_lightning():
    root = Path(diag.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in {"lightning", "pytorch_lightning"} for n in names), path


# ----------------------------------------------------------------------------- MetricsLogger


def test_metrics_logger_json_csv_and_seed_aggregation(tmp_path):
    a, b = MetricsLogger(), MetricsLogger()
    a.log({"epoch": 1, "loss": 1.0, "opt": "muon"})
    a.log({"epoch": 2, "loss": 0.5, "acc": 0.9})
    b.log({"epoch": 1, "loss": 3.0, "opt": "muon"})
    a.save_json(tmp_path / "a.json")
    assert MetricsLogger.load_json(tmp_path / "a.json").history == a.history
    a.save_csv(tmp_path / "a.csv")
    assert (tmp_path / "a.csv").read_text().splitlines() == ["epoch,loss,opt,acc", "1,1.0,muon,", "2,0.5,,0.9"]
    agg = MetricsLogger.aggregate_seeds([a, b])
    assert agg["mean"][0] == {"epoch": 1.0, "loss": 2.0}
    assert agg["std"][0]["loss"] == pytest.approx(math.sqrt(2.0))
    assert agg["mean"][1] == {"epoch": 2.0, "loss": 0.5, "acc": 0.9} and math.isnan(agg["std"][1]["loss"])
