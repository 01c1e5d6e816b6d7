"""The seven geometric optimizers: each keeps its constraint through training, steps
downhill, reports its constraint per matrix, handles closures and state, refuses bad input."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from lightning_spectral.optim.base import AUX_ADAMW
from lightning_spectral.optim import (
    BlockStiefel,
    DoublyStochastic,
    Grassmann,
    L1Stiefel,
    Oblique,
    SLMuon,
    Symplectic,
    sinkhorn,
    symplectic_form,
)


pytestmark = pytest.mark.usefixtures("single_thread")


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def named_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Named parameters, split by ndim when the optimizer is built: every weight takes the matrix
    rule (whatever :func:`~lightning_spectral.optim.param_groups.build_param_groups` does with a
    model's head), the biases the fallback."""
    return list(model.named_parameters())


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(128, 8, generator=g)
    teacher = torch.randn(8, 4, generator=g)
    return X, (X @ teacher).argmax(1)


def gram_error(W: torch.Tensor) -> float:
    W = W if W.shape[0] >= W.shape[1] else W.mT
    return float((W.mT @ W - torch.eye(W.shape[1])).norm() / W.shape[1] ** 0.5)


# name: (class, kwargs for the MLP run, tolerance on the reported constraint, what it means)
CASES = {
    "oblique": (Oblique, dict(lr=0.05), 1e-6, "max |‖column‖ − 1|"),
    "oblique_rows": (Oblique, dict(lr=0.05, dim="rows", radius=2.0), 1e-6, "max |‖row‖/2 − 1|"),
    "sl": (SLMuon, dict(lr=0.01), None, "|det W − 1| (tolerance from W's conditioning: det_tolerance)"),
    "symplectic": (Symplectic, dict(lr=0.02), 1e-6, "‖WᵀJW − J‖_F/(√n·max(1, ‖W‖₂²))"),
    "l1_stiefel": (L1Stiefel, dict(lr=0.05, l1_weight=1e-3), 1e-5, "‖WᵀW − I‖_F/√k"),
    "block_stiefel": (BlockStiefel, dict(lr=0.05, block_size=4), 1e-5, "max over blocks ‖XᵀX − I‖_F/√k"),
    "doubly_stochastic": (DoublyStochastic, dict(lr=0.3), 1e-5, "max |row/col sum − 1|, negativity"),
    "grassmann": (Grassmann, dict(lr=0.05), 1e-5, "‖WᵀW − I‖_F/√k"),
    "l1_stiefel_riemannian": (L1Stiefel, dict(lr=0.5, direction="riemannian"), 1e-5, "‖WᵀW − I‖_F/√k"),
}


def det_tolerance(W: torch.Tensor) -> float:
    """|det W − 1| that storing an exact (float64) point of SL(n) in float32 can cause: each entry
    moves by at most u = eps/2 relative, which moves log det by |tr(W⁻¹δW)| ≤ ‖W⁻¹‖_F u ‖W‖_F
    (first order, Cauchy–Schwarz), doubled for the higher orders."""
    W = W.double()
    return 2 * (torch.finfo(torch.float32).eps / 2) * float(torch.linalg.inv(W).norm()) * float(W.norm())


# Matrices of the MLP (8→16→16→4) kept on each manifold; the others take the AdamW fallback.
ON_MANIFOLD = {
    Oblique: {"0.weight", "2.weight", "4.weight"},
    SLMuon: {"2.weight"},
    Symplectic: {"2.weight"},
    L1Stiefel: {"0.weight", "2.weight", "4.weight"},
    BlockStiefel: {"0.weight", "2.weight", "4.weight"},
    DoublyStochastic: {"2.weight"},
    Grassmann: {"0.weight", "4.weight"},
}


# The fallback these runs were tuned with (AdamW at 1e-3; the package's default is the auxiliary
# AdamW, 3e-4 and betas (0.9, 0.95)): the matrices a set cannot hold train with it.
FALLBACK = dict(fallback_lr=1e-3, fallback_betas=(0.9, 0.999))


def train(opt_cls, kwargs, steps=300, model=None):
    model = model or mlp()
    X, y = data()
    opt = opt_cls(named_params(model), **{**FALLBACK, **kwargs})
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, opt, losses


@pytest.mark.parametrize("case", list(CASES))
def test_constraint_holds_after_training(case):
    opt_cls, kwargs, tol, _ = CASES[case]
    model, opt, losses = train(opt_cls, kwargs)
    assert losses[-1] < 0.6 * losses[0], f"{case} did not train: {losses[0]:.3f} -> {losses[-1]:.3f}"
    report = opt.constraint_report()
    assert set(report) == ON_MANIFOLD[opt_cls]
    W = dict(model.named_parameters())
    if opt_cls is SLMuon:  # κ(W) ≈ 8e3 after these steps: 1.5e-3 (measured 3.6e-5 with AVX-512, 5.5e-5 without)
        tol = det_tolerance(W["2.weight"].detach())
    for name, entry in report.items():
        assert 0.0 <= entry["constraint"] <= tol, (case, name, entry)
    # Independent checks of the same constraints, from the weights themselves.
    if opt_cls is Oblique:
        dim = 1 if kwargs.get("dim") == "rows" else 0
        for name in report:
            norms = W[name].detach().norm(dim=dim)
            assert torch.allclose(norms, torch.full_like(norms, kwargs.get("radius", 1.0)), atol=1e-5)
    elif opt_cls in (L1Stiefel, Grassmann):
        for name in report:
            assert gram_error(W[name].detach()) < tol
    elif opt_cls is BlockStiefel:
        for block in W["2.weight"].detach().split(4, dim=0):
            assert gram_error(block) < tol
    elif opt_cls is SLMuon:
        M = W["2.weight"].detach().double()
        assert abs(float(torch.linalg.det(M)) - 1.0) < tol
        assert float(torch.linalg.cond(M)) < 1e5  # measured 8e3 here; det_tolerance ≤ eps·n·κ grows with κ
    elif opt_cls is Symplectic:
        M, J = W["2.weight"].detach().double(), symplectic_form(16)
        assert float((M.mT @ J @ M - J).abs().max()) < 1e-5 * max(1.0, float(torch.linalg.matrix_norm(M, 2)) ** 2)
    elif opt_cls is DoublyStochastic:
        M = W["2.weight"].detach().double()
        assert float(M.min()) >= 0.0
        assert torch.allclose(M.sum(0), torch.ones(16, dtype=M.dtype), atol=1e-5)
        assert torch.allclose(M.sum(1), torch.ones(16, dtype=M.dtype), atol=1e-5)
        s = torch.linalg.svdvals(M)
        assert float(s[1] / s[0]) > 0.3, ("collapsed towards the rank-1 averaging matrix 11ᵀ/n (the known failure of "
                                          "a uniform start re-balanced by plain Sinkhorn after every step)")


def test_conv_kernels_are_out_by_in_kh_kw_matrices():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    x = torch.randn(4, 3, 6, 6)
    for opt_cls in (Oblique, L1Stiefel):
        opt = opt_cls([conv.weight], lr=0.05)
        for _ in range(20):
            opt.zero_grad()
            conv(x).square().mean().backward()
            opt.step()
        W = conv.weight.detach().reshape(8, 27)
        if opt_cls is Oblique:
            assert torch.allclose(W.norm(dim=0), torch.ones(27), atol=1e-5)
        else:
            assert gram_error(W) < 1e-5


# -- descent on f(W) = ½‖W − T‖² (+ λ‖W‖₁), T on the manifold --------------------------------
DESCENT = {
    "oblique": (Oblique, (6, 4), {}),
    "sl": (SLMuon, (5, 5), {}),
    "symplectic": (Symplectic, (6, 6), {}),
    "l1_stiefel": (L1Stiefel, (7, 4), dict(l1_weight=0.1)),
    "block_stiefel": (BlockStiefel, (8, 6), dict(block_size=4)),
    "doubly_stochastic": (DoublyStochastic, (5, 5), {}),
    "grassmann": (Grassmann, (7, 3), {}),
    "grassmann_wide": (Grassmann, (3, 7), {}),
}


def on_manifold(opt_cls, shape, kwargs, seed):
    torch.manual_seed(seed)
    p = nn.Parameter(torch.randn(*shape))
    opt_cls([p], lr=0.1, **kwargs)  # projects onto the manifold
    return p


@pytest.mark.parametrize("case", list(DESCENT))
@pytest.mark.parametrize("direction", ["msign", "riemannian"])
def test_step_is_a_descent_direction(case, direction):
    opt_cls, shape, kwargs = DESCENT[case]
    if opt_cls is DoublyStochastic and direction == "msign":
        pytest.skip("the Birkhoff polytope takes the mirror step only")
    extra = {} if opt_cls is DoublyStochastic else dict(direction=direction)
    lam = kwargs.get("l1_weight", 0.0)
    for seed in range(3):
        T = on_manifold(opt_cls, shape, kwargs, 100 + seed).detach()
        W = on_manifold(opt_cls, shape, kwargs, seed)

        def objective():
            return 0.5 * (W - T).square().sum() + lam * W.abs().sum()

        opt = opt_cls([W], lr=1e-3, momentum=0.0, **kwargs, **extra)
        before, W0 = objective().item(), W.detach().clone()
        opt.zero_grad()
        objective().backward()
        grad = W.grad.clone() + 0.0
        opt.step()
        step = W.detach() - W0
        assert float((grad * step).sum()) < 0, (case, direction, seed)
        assert objective().item() < before, (case, direction, seed)
        # and many steps keep going downhill on the manifold
        opt = opt_cls([W], lr=0.02, momentum=0.0, **kwargs, **extra)
        start = objective().item()
        for _ in range(50):
            opt.zero_grad()
            objective().backward()
            opt.step()
        assert objective().item() < start, (case, direction, seed)


def test_grassmann_horizontal_gradient_is_a_descent_direction():
    """(I − WWᵀ)G is an orthogonal projection of G, so ⟨PG, G⟩ = ‖PG‖² ≥ 0, only when W is
    orthonormal (with a merely row-normalised W it can point uphill); the optimizer makes W so."""
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(10, 32))
    opt = Grassmann([W], lr=0.05, momentum=0.0, direction="riemannian")
    assert gram_error(W.detach()) < 1e-5
    G = torch.randn(10, 32)
    Wt, Gt = W.detach().mT, G.mT
    P = Gt - Wt @ (Wt.mT @ Gt)
    assert float((P * Gt).sum()) > 0 and torch.allclose((P * Gt).sum(), P.square().sum(), rtol=1e-4)
    assert opt.constraint_report()["0.0"]["constraint"] < 1e-5


# -- shapes, fallback, refusal ------------------------------------------------------------------
def test_unsupported_shapes_follow_the_fallback_and_are_not_frozen():
    model = mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, opt, _ = train(Grassmann, dict(lr=0.05), steps=5, model=model)
    square = model[2].weight
    assert "exp_avg" in opt.state[square]  # AdamW fallback, not a frozen Gr(n, n)
    for name, p in model.named_parameters():
        assert not torch.equal(p.detach(), before[name]), name


def test_block_stiefel_finds_its_parameters_or_refuses():
    model = mlp()
    _, opt, _ = train(BlockStiefel, dict(block_size=4), steps=2, model=model)
    assert all("momentum_buffer" in opt.state[p] for p in (model[0].weight, model[2].weight, model[4].weight))
    with pytest.raises(ValueError, match=r"'4\.weight'.*not divisible by block_size=8"):
        BlockStiefel(named_params(mlp()), block_size=8)
    opt = BlockStiefel(named_params(mlp()), block_size=8, unsupported="fallback")
    assert set(opt.constraint_report()) == {"0.weight", "2.weight"}
    with pytest.raises(ValueError, match="no matrix parameter fits"):
        BlockStiefel(named_params(mlp()), block_size=5, unsupported="fallback")


@pytest.mark.parametrize("opt_cls", [SLMuon, Symplectic, DoublyStochastic, Grassmann])
def test_refuses_when_nothing_fits_or_when_asked(opt_cls):
    odd = nn.Linear(7, 7, bias=False) if opt_cls is not Grassmann else nn.Linear(6, 6, bias=False)
    wide = nn.Linear(7, 3, bias=False)
    shapes = [odd.weight] if opt_cls is Symplectic else [wide.weight]
    if opt_cls is Grassmann:
        shapes = [odd.weight]
    with pytest.raises(ValueError, match="no matrix parameter fits"):
        opt_cls(shapes, lr=0.1)
    fits = nn.Linear(4, 4, bias=False) if opt_cls is not Grassmann else nn.Linear(4, 6, bias=False)
    with pytest.raises(ValueError, match=r"parameter 'bad'.*cannot be kept on the manifold"):
        opt_cls([("good", fits.weight), ("bad", shapes[0])], lr=0.1, unsupported="error")


@pytest.mark.parametrize(
    "opt_cls, kwargs, match",
    [
        (Oblique, dict(lr=-1.0), "lr must be >= 0 and finite"),
        (Oblique, dict(lr=float("nan")), "lr must be >= 0 and finite"),
        (Oblique, dict(momentum=1.0), "momentum must be in"),
        (Oblique, dict(direction="adam"), "direction must be one of"),
        (Oblique, dict(dim="diagonal"), "dim must be one of"),
        (Oblique, dict(radius=-1.0), "radius must be a positive"),
        (Oblique, dict(unsupported="ignore"), "unsupported must be one of"),
        (Oblique, dict(ns_schedule="nope"), "unknown msign schedule"),
        (L1Stiefel, dict(l1_weight=-1e-3), "l1_weight must be"),
        (L1Stiefel, dict(retraction_tol=0.0), "retraction_tol must be a positive"),
        (BlockStiefel, dict(block_size=0), "block_size must be an integer"),
        (BlockStiefel, dict(block_size=4, blocks="heads"), "blocks must be one of"),
        (DoublyStochastic, dict(normalize="l2"), "normalize must be"),
        (DoublyStochastic, dict(init_temperature=0.0), "init_temperature must be"),
        (DoublyStochastic, dict(sinkhorn_max_iters=0), "sinkhorn_max_iters must be"),
        (SLMuon, dict(fallback="lion"), "fallback must be one of"),
    ],
)
def test_bad_arguments(opt_cls, kwargs, match):
    p = nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match=match):
        opt_cls([p], **kwargs)


# -- report, closure, state ---------------------------------------------------------------------
def test_constraint_report_names_every_matrix_on_the_manifold():
    model = mlp()
    opt = SLMuon(named_params(model))
    report = opt.constraint_report()
    assert list(report) == ["2.weight"] and report["2.weight"]["constraint"] < 1e-5
    net = mlp()
    ds = DoublyStochastic(named_params(net))
    # Built: the state is empty (as torch's distributed checkpoint expects); the Sinkhorn statistics follow the first step.
    assert not ds.state and set(ds.constraint_report()["2.weight"]) == {"constraint"}
    X, y = data()
    nn.functional.cross_entropy(net(X), y).backward()
    ds.step()
    entry = ds.constraint_report()["2.weight"]
    assert {"constraint", "inner_iterations", "inner_residual"} <= set(entry)


@pytest.mark.parametrize("opt_cls", [Oblique, Symplectic, DoublyStochastic])
def test_closure_is_called_and_its_loss_returned(opt_cls):
    model = mlp()
    X, y = data()
    opt = opt_cls(named_params(model))
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [1] and isinstance(loss, torch.Tensor) and loss.ndim == 0


@pytest.mark.parametrize(
    "opt_cls, kwargs",
    [(Oblique, {}), (SLMuon, {}), (Symplectic, {}), (L1Stiefel, {}), (BlockStiefel, dict(block_size=4)),
     (DoublyStochastic, {}), (Grassmann, {})],
)
def test_state_dict_round_trip_continues_bit_identically(opt_cls, kwargs):
    X, y = data()

    def steps(model, opt, n):
        for _ in range(n):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            opt.step()

    model = mlp()
    opt = opt_cls(named_params(model), **kwargs)
    steps(model, opt, 4)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    clone = mlp(seed=1)
    opt_clone = opt_cls(named_params(clone), **kwargs)  # built first: it projects the weights
    clone.load_state_dict(saved["model"])
    opt_clone.load_state_dict(saved["opt"])
    steps(model, opt, 3)
    steps(clone, opt_clone, 3)
    for (name, a), b in zip(model.state_dict().items(), clone.state_dict().values()):
        assert torch.equal(a, b), name


def test_non_finite_gradient_is_refused_without_touching_weights():
    from lightning_spectral.optim import NonFiniteGradientError

    model = mlp()
    opt = Symplectic(named_params(model))
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model[2].weight.grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteGradientError, match="2.weight"):
        opt.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))


def test_sinkhorn_balances_near_permutations_quickly():
    torch.manual_seed(0)
    n = 32
    K = torch.eye(n)[torch.randperm(n)] + 1e-4 * torch.rand(n, n)  # σ₂ ≈ 1: plain sweeps crawl
    W, iterations, residual = sinkhorn(K, tol=1e-10, max_iters=100)
    assert residual <= 1e-10 and iterations < 30
    assert float(W.min()) >= 0 and torch.allclose(W.sum(0), torch.ones(n, dtype=W.dtype), atol=1e-12)


# -- unsupported shapes: a fallback group of their own, reached by schedulers ----------------------
def test_unsupported_matrices_get_a_fallback_group_that_schedulers_reach():
    model = mlp()
    X, y = data()
    opt = Grassmann(named_params(model), lr=0.05, fallback_lr=1e-2)
    assert [g.get("name") for g in opt.param_groups] == [None, "matrix_fallback", None]
    fallback = opt.param_groups[1]
    assert fallback["params"] == [model[2].weight] and fallback["param_names"] == ["2.weight"]
    assert not fallback["matrix"] and fallback["lr"] == 1e-2 and fallback["algorithm"] == "adamw"
    factors = [1.0, 0.5, 0.1, 0.02, 0.01]
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: factors[step])
    square = model[2].weight
    reference = nn.Parameter(square.detach().clone())
    # the fallback's defaults, the auxiliary AdamW: betas (0.9, 0.95), eps 1e-8, no weight decay
    adamw = torch.optim.AdamW([reference], lr=1e-2, betas=AUX_ADAMW["betas"], eps=AUX_ADAMW["eps"], weight_decay=0.0)
    for step in range(4):
        assert fallback["lr"] == pytest.approx(1e-2 * factors[step])
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        reference.grad = square.grad.clone()
        for group in adamw.param_groups:
            group["lr"] = 1e-2 * factors[step]
        before = square.detach().clone()
        opt.step()
        adamw.step()
        scheduler.step()
        assert torch.allclose(square.detach(), reference.detach(), rtol=0, atol=1e-7), step
    # a learning rate frozen at 1e-2 would have moved the last step five times as far
    assert float((square.detach() - before).abs().max()) < 0.5 * 1e-2


def test_state_dict_with_a_fallback_group_round_trips():
    model = mlp()
    X, y = data()
    opt = Grassmann(named_params(model))
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    clone = mlp(seed=1)
    opt_clone = Grassmann(named_params(clone))
    clone.load_state_dict(model.state_dict())
    opt_clone.load_state_dict(torch.load(_saved(opt.state_dict()), weights_only=True))
    assert torch.equal(opt_clone.state[clone[2].weight]["exp_avg"], opt.state[model[2].weight]["exp_avg"])
    assert opt_clone.param_groups[1]["name"] == "matrix_fallback"


def _saved(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


# -- bad input: a clear error naming the parameter, or the right behaviour ------------------------------
def test_doubly_stochastic_leaves_a_1x1_matrix_to_the_fallback():
    one, square = nn.Parameter(torch.randn(1, 1)), nn.Parameter(torch.randn(4, 4))
    opt = DoublyStochastic([("one", one), ("square", square)], lr=0.1)
    assert opt.param_groups[1]["param_names"] == ["one"] and not opt.param_groups[1]["matrix"]
    assert torch.isfinite(one).all() and set(opt.constraint_report()) == {"square"}
    one.grad, square.grad = torch.ones(1, 1), torch.randn(4, 4)
    opt.step()
    assert torch.isfinite(one).all() and torch.isfinite(square).all()
    with pytest.raises(ValueError, match=r"no matrix parameter fits.*'one'.*single point \[\[1\]\]"):
        DoublyStochastic([("one", nn.Parameter(torch.randn(1, 1)))])
    with pytest.raises(ValueError, match=r"parameter 'one' cannot be kept on the manifold.*single point"):
        DoublyStochastic([("one", one), ("square", square)], unsupported="error")


def test_zero_matrices_are_refused_by_the_sets_that_cannot_scale_them():
    from lightning_spectral.optim import SpectralBall

    for build in (lambda p: SpectralBall([("w", p)]), lambda p: SLMuon([("w", p)])):
        p = nn.Parameter(torch.zeros(4, 4))
        with pytest.raises(ValueError, match=r"parameter 'w': it is the zero matrix.*initialise it"):
            build(p)
        assert torch.equal(p.detach(), torch.zeros(4, 4))  # nothing written, no NaN
    p = nn.Parameter(torch.zeros(4, 6))
    opt = SpectralBall([("w", p)], constraint="ball")  # the zero matrix is inside the ball
    p.grad = torch.randn(4, 6)
    opt.step()
    assert torch.isfinite(p).all() and float(torch.linalg.matrix_norm(p.detach(), ord=2)) > 0


@pytest.mark.parametrize("opt_cls", [Symplectic, L1Stiefel, Grassmann, BlockStiefel])
def test_zero_matrices_start_on_the_sets_that_have_a_nearest_point(opt_cls):
    """Every orthogonal symplectic matrix (every orthonormal frame) is nearest to 0: one is picked."""
    p = nn.Parameter(torch.zeros(4, 4) if opt_cls in (Symplectic, BlockStiefel) else torch.zeros(6, 4))
    kwargs = dict(block_size=2) if opt_cls is BlockStiefel else {}
    opt = opt_cls([("w", p)], **kwargs)
    assert opt.constraint_report()["w"]["constraint"] <= 1e-6
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    assert opt.constraint_report()["w"]["constraint"] <= 1e-5


@pytest.mark.parametrize("opt_cls", [Oblique, SLMuon, DoublyStochastic])
def test_meta_parameters_are_refused_with_the_fix(opt_cls):
    p = nn.Parameter(torch.empty(4, 4, device="meta"))
    with pytest.raises(ValueError, match=r"parameter 'w' is on the meta device.*to_empty"):
        opt_cls([("w", p)])


def test_meta_parameters_are_refused_by_the_manifold_optimizers():
    from lightning_spectral.optim import ManifoldMuon, SpectralBall

    for opt_cls in (ManifoldMuon, SpectralBall):
        with pytest.raises(ValueError, match=r"parameter 'w' is on the meta device"):
            opt_cls([("w", nn.Parameter(torch.empty(4, 3, device="meta")))])


def _trained(opt_cls, model, **kwargs):
    X = torch.randn(16, model[0].in_features)
    opt = opt_cls(named_params(model), **kwargs)
    opt.zero_grad()
    model(X).square().mean().backward()
    opt.step()
    return opt


@pytest.mark.parametrize("opt_cls", ["ManifoldMuon", "SpectralBall", "Oblique", "Grassmann"])
def test_state_dict_of_other_shapes_is_refused_before_anything_changes(opt_cls):
    import lightning_spectral.optim as optim

    cls = getattr(optim, opt_cls)
    kwargs = dict(momentum=0.9) if opt_cls in ("ManifoldMuon", "SpectralBall") else {}
    saved = _trained(cls, nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), **kwargs).state_dict()
    other = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))
    opt = _trained(cls, other, **kwargs)
    before = {p: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()} for p, s in opt.state.items()}
    with pytest.raises(ValueError, match=r"the state '\w+' of parameter '0\.weight' has shape \(16.*\), "
                                         r"but this parameter needs \(12.*\).*another model"):
        opt.load_state_dict(saved)
    for p, state in opt.state.items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(before[p][key])), key


def test_a_group_of_unsupported_matrices_becomes_a_fallback_group_and_old_layouts_load():
    sq, tall, sq2 = (nn.Parameter(torch.randn(*s)) for s in ((4, 4), (6, 4), (4, 4)))
    groups = [dict(params=[sq, tall], name="a"), dict(params=[sq2], name="b", lr=0.01)]
    opt = Grassmann(groups)
    assert [(g["name"], g["matrix"], len(g["params"])) for g in opt.param_groups] == [
        ("a", True, 1), ("a_fallback", False, 1), ("b_fallback", False, 1)]
    # the fallback rule's lr, not group b's (meant for the Grassmann steps)
    assert opt.param_groups[2]["lr"] == AUX_ADAMW["lr"]
    # the layout before unsupported matrices had groups of their own: ids in the original order
    step = torch.zeros(())
    old = {"state": {0: {"step": step + 3, "exp_avg": torch.ones(4, 4), "exp_avg_sq": torch.ones(4, 4)},
                     1: {"momentum_buffer": torch.full((6, 4), 2.0)},
                     2: {"step": step + 5, "exp_avg": torch.ones(4, 4), "exp_avg_sq": torch.ones(4, 4)}},
           "param_groups": [{k: v for k, v in opt.param_groups[0].items() if k != "params"} | dict(
                                params=[0, 1], fallback_rule=dict(algorithm="sgd", lr=0.5, fallback_momentum=0.0)),
                            {k: v for k, v in opt.param_groups[0].items() if k != "params"} | dict(
                                params=[2], name="b", fallback_rule=dict(algorithm="adamw", lr=0.02))]}
    upgraded = opt.upgrade_param_groups(old["param_groups"])  # what a resume compares with
    assert [(g["name"], g["params"]) for g in upgraded] == [("a", [1]), ("a_fallback", [0]), ("b_fallback", [2])]
    assert opt.upgrade_param_groups(opt.state_dict()["param_groups"]) == opt.state_dict()["param_groups"]
    opt.load_state_dict(old)
    assert float(opt.state[sq]["step"]) == 3 and float(opt.state[sq2]["step"]) == 5
    assert torch.equal(opt.state[tall]["momentum_buffer"], torch.full((6, 4), 2.0))
    assert (opt.param_groups[1]["algorithm"], opt.param_groups[1]["lr"]) == ("sgd", 0.5)
    assert (opt.param_groups[2]["algorithm"], opt.param_groups[2]["lr"], opt.param_groups[2]["name"]) == (
        "adamw", 0.02, "b_fallback")
    for p in (sq, tall, sq2):
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.constraint_report()["a.0"]["constraint"] <= 1e-5

