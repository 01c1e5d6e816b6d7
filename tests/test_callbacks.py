"""Callbacks: they never change training, log with one step convention, validate, and checkpoint their state."""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_spectral.callbacks import (
    ConstraintMonitor,
    GradientNoiseScaleMonitor,
    SharpnessMonitor,
    SpectralNormMonitor,
)
from lightning_spectral.diagnostics import GradientNoiseScale, estimate_sharpness, grad_sq_norms

N, D, C, BATCH = 96, 6, 3, 16  # 6 batches per epoch


def make_data() -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(N, D, generator=g)
    return TensorDataset(x, (x[:, :C] * 2).argmax(1))


class Net(pl.LightningModule):
    """BatchNorm and dropout, so that a callback touching BN statistics or the RNG would show."""

    def __init__(self, automatic: bool = True, lr: float = 0.1):
        super().__init__()
        self.automatic_optimization = automatic
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(D, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, C))
        self.criterion = nn.CrossEntropyLoss()
        self.losses: list[float] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.criterion(self(x), y)
        self.losses.append(loss.item())
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(make_data(), batch_size=BATCH, shuffle=True)


class NoLossNet(Net):
    criterion = None

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])


class BatchLossNet(NoLossNet):
    def loss_for_batch(self, batch):
        return F.cross_entropy(self(batch["x"]), batch["y"])

    def training_step(self, batch, batch_idx):
        return self.loss_for_batch(batch)

    def train_dataloader(self):
        data = make_data()
        return DataLoader([{"x": x, "y": y} for x, y in data], batch_size=BATCH)


class ReportingSGD(torch.optim.SGD):
    """Stands in for a manifold optimizer with the `constraint_report()` protocol."""

    def constraint_report(self) -> dict[str, dict[str, float]]:
        w = self.param_groups[0]["params"][0]
        return {"net.0.weight": {"constraint": float(w.norm()), "inner_iterations": 3.0},
                "net.4.weight": {"constraint": 0.5, "inner_iterations": 7.0}}


class ReportingNet(Net):
    def configure_optimizers(self):
        return ReportingSGD(self.parameters(), lr=self.lr)


class RecordingLogger(Logger):
    """Duck-typed TensorBoard-like logger that records scalars and histograms with their steps."""

    def __init__(self):
        super().__init__()
        self.scalars: list[tuple[int, dict[str, float]]] = []
        self.histograms: list[tuple[str, int]] = []

    @property
    def name(self):
        return "rec"

    @property
    def version(self):
        return 0

    @property
    def experiment(self):
        return self

    def add_histogram(self, tag, values, global_step=None):
        self.histograms.append((tag, global_step))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.scalars.append((step, dict(metrics)))

    def steps_of(self, key: str) -> list[int]:
        return [s for s, m in self.scalars if key in m]


def loss_fn(model, x, y):
    return F.cross_entropy(model(x), y)


def all_callbacks(n: int = 2, eval_mode: bool = True) -> list[Callback]:
    return [
        SpectralNormMonitor(every_n_steps=n),
        SharpnessMonitor(every_n_steps=n, max_iter=5, eval_mode=eval_mode),
        GradientNoiseScaleMonitor(every_n_steps=n, eval_mode=eval_mode),
        ConstraintMonitor(every_n_steps=n),
    ]


def fit(model, tmp_path, callbacks=(), logger=False, **kwargs):
    kwargs = {"max_epochs": 2, "enable_checkpointing": False, **kwargs}
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=logger, callbacks=list(callbacks), default_root_dir=tmp_path,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, **kwargs,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(model)
    return trainer


# ----------------------------------------------------------------------------- never change training


@pytest.mark.parametrize("eval_mode", [True, False], ids=["eval", "train-mode-measurements"])
@pytest.mark.parametrize("automatic", [True, False], ids=["automatic", "manual"])
def test_callbacks_leave_the_trajectory_bit_identical(tmp_path, automatic, eval_mode):
    """Same losses, weights and BN statistics with and without the callbacks (train-mode measurements
    run dropout and update BN statistics, so they also exercise the RNG fork and the buffer restore)."""
    runs = []
    loggers = [CSVLogger(tmp_path), TensorBoardLogger(tmp_path)]
    for callbacks, logger in [((), False), (all_callbacks(eval_mode=eval_mode), loggers)]:
        pl.seed_everything(0)
        model = Net(automatic)
        fit(model, tmp_path, callbacks, logger)
        runs.append((model.losses, [t.clone() for t in model.state_dict().values()]))
    (losses_a, state_a), (losses_b, state_b) = runs
    assert len(losses_a) == 12 and losses_a == losses_b
    assert all(torch.equal(a, b) for a, b in zip(state_a, state_b))  # weights and BN running statistics


# ----------------------------------------------------------------------------- logging and step convention


def test_step_convention_histograms_and_values(tmp_path):
    logger = RecordingLogger()
    spectral, sharp, gns = SpectralNormMonitor(every_n_steps=3), SharpnessMonitor(every_n_steps=3, max_iter=300, tol=1e-7), \
        GradientNoiseScaleMonitor(every_n_steps=3, num_chunks=2)
    first: dict[str, Any] = {}

    class Capture(Callback):  # state at step 0, before the callbacks above ran... they run first in list order
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0:
                first["batch"] = [t.clone() for t in batch]
                first["state"] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    pl.seed_everything(0)
    fit(Net(), tmp_path, [Capture(), spectral, sharp, gns], logger, max_epochs=1)
    for key in ("spectral_norm/max", "stable_rank/net.0", "sharpness/lambda_max", "gns/b_simple"):
        assert logger.steps_of(key) == [0, 3], key  # after 0 and 3 optimizer steps, 6 batches
    assert sorted({t for t, _ in logger.histograms}) == ["singular_values/net.0", "singular_values/net.4"]
    assert sorted({s for _, s in logger.histograms}) == [0, 3]
    step0 = {k: v for s, m in logger.scalars if s == 0 for k, v in m.items()}
    assert step0["sharpness/threshold/SGD"] == pytest.approx((2 + 2 * 0.9) / 0.1)  # heavy ball, β = 0.9

    ref = Net()
    ref.load_state_dict(first["state"])
    x, y = first["batch"]
    sharp_ref = estimate_sharpness(ref, loss_fn, x, y, max_iter=200, tol=1e-8)
    assert step0["sharpness/lambda_max"] == pytest.approx(sharp_ref, rel=1e-2)
    exact = float(torch.linalg.matrix_norm(ref.net[0].weight.detach(), ord=2))
    assert step0["spectral_norm/net.0"] == pytest.approx(exact, rel=1e-3)
    ref.eval()
    small, big = grad_sq_norms(lambda b: loss_fn(ref, *b), list(ref.parameters()), [(x[:8], y[:8]), (x[8:], y[8:])])
    est = GradientNoiseScale()
    est.update(small, big, 8, 16)
    assert step0["gns/grad_sq"] == pytest.approx(est.grad_sq, rel=1e-5)
    assert step0["gns/trace"] == pytest.approx(est.trace, rel=1e-5)


def test_epoch_mode_and_csv(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    pl.seed_everything(0)
    fit(Net(), tmp_path, [SpectralNormMonitor(every_n_epochs=1), GradientNoiseScaleMonitor(every_n_epochs=2)], logger)
    rows = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    step_col, norm_col, gns_col = header.index("step"), header.index("spectral_norm/max"), header.index("gns/b_simple")
    cells = [r.split(",") for r in rows[1:]]
    assert [int(c[step_col]) for c in cells if c[norm_col]] == [6, 12]  # end of each 6-batch epoch
    assert [int(c[step_col]) for c in cells if c[gns_col]] == [12]


class TinyGPTNet(pl.LightningModule):
    """Next-token prediction on random tokens with a 4-head GPT (n_embd 16, head_dim 4)."""

    def __init__(self):
        super().__init__()
        from lightning_spectral.models import GPT

        self.model = GPT(vocab_size=11, block_size=8, n_layer=2, n_head=4, n_embd=16)

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        logits = self.model(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        tokens = torch.randint(0, 11, (32, 9), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(tokens), batch_size=8)


@pytest.mark.parametrize("method, tol", [("svd", 1e-6), ("power", 1e-4)])
def test_per_head_norms_reach_logger_and_callback_metrics(tmp_path, method, tol):
    logger = RecordingLogger()
    cb = SpectralNormMonitor(every_n_steps=2, method=method, blocks="auto", max_iter=3000, tol=1e-10,
                             log_histograms=False)
    pl.seed_everything(0)
    net = TinyGPTNet()
    trainer = fit(net, tmp_path, [cb], logger, max_epochs=1)  # 4 steps: measured after 0 and 2
    d = net.model.head_dim
    heads = {f"spectral_norm/model.blocks.{i}.attn.{p}/head{h}" for i in range(2)
             for p in ("q_proj", "k_proj", "v_proj", "o_proj") for h in range(4)}
    assert {k for k in cb.last_metrics if "/head" in k} == heads
    assert heads <= set(trainer.callback_metrics)
    assert all(logger.steps_of(k) == [0, 2] for k in heads)
    step2 = {k: v for s, m in logger.scalars if s == 2 for k, v in m.items()}
    layers = [k for k in step2 if k.startswith("spectral_norm/") and "/head" not in k and k != "spectral_norm/max"]
    assert "spectral_norm/model.blocks.0.attn.q_proj" in layers  # the layer metrics stay
    assert step2["spectral_norm/max"] == max(step2[k] for k in layers)  # over whole layers only
    measured = cb.measure(trainer, net, None, trainer.global_step)  # the final weights, against each sliced head
    for i, block in enumerate(net.model.blocks):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w = getattr(block.attn, p).weight.detach()
            for h in range(4):
                part = w[:, h * d:(h + 1) * d] if p == "o_proj" else w[h * d:(h + 1) * d]
                truth = float(torch.linalg.matrix_norm(part, ord=2))
                assert measured[f"spectral_norm/model.blocks.{i}.attn.{p}/head{h}"] == pytest.approx(truth, rel=tol)


def test_per_head_bad_glob_fails_naming_the_glob(tmp_path):
    with pytest.raises(ValueError, match=r"glob '\*\.query' matches no measured layer"):
        fit(TinyGPTNet(), tmp_path, [SpectralNormMonitor(every_n_steps=1, blocks={"*.query": 4})], RecordingLogger(),
            max_epochs=1)


def test_without_logger_keeps_last_metrics(tmp_path):
    cb = SpectralNormMonitor(every_n_steps=5, method="svd")
    with pytest.warns(UserWarning, match="no logger"):
        fit(Net(), tmp_path, [cb], logger=False, max_epochs=1)
    assert cb.num_measurements == 2 and cb.elapsed_s > 0
    assert set(cb.last_metrics) >= {"spectral_norm/net.0", "spectral_norm/net.4", "spectral_norm/max"}


# ----------------------------------------------------------------------------- loss protocol


def test_loss_protocol(tmp_path):
    for callback in (SharpnessMonitor(every_n_steps=1), GradientNoiseScaleMonitor(every_n_steps=1)):
        with pytest.raises(MisconfigurationException, match="needs a loss.*manual optimization.*loss_for_batch"):
            fit(NoLossNet(automatic=False), tmp_path, [callback], max_epochs=1, limit_train_batches=1)
    cb = SharpnessMonitor(every_n_steps=1, loss_fn=loss_fn, max_iter=3)
    fit(NoLossNet(automatic=False), tmp_path, [cb], max_epochs=1, limit_train_batches=2)
    assert cb.num_measurements == 2 and math.isfinite(cb.last_metrics["sharpness/lambda_max"])
    cbs = [SharpnessMonitor(every_n_steps=1, max_iter=3), GradientNoiseScaleMonitor(every_n_steps=1)]
    fit(BatchLossNet(), tmp_path, cbs, max_steps=2)  # dict batches through loss_for_batch
    assert all(cb.num_measurements == 2 for cb in cbs)


class DictLossNet(NoLossNet):
    """A typical foreign module: no criterion, no loss_for_batch; training_step logs, updates a
    torchmetrics metric and returns a dict (``as_dict``) or the loss tensor."""

    def __init__(self, as_dict: bool = True):
        super().__init__()
        self.as_dict = as_dict
        self.acc = MulticlassAccuracy(C, average="micro")

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        batch_acc = self.acc(logits, y)  # updates the metric's state
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        self.log_dict({"train/acc": batch_acc}, on_step=True, on_epoch=False)
        return {"loss": loss, "logits": logits.detach()} if self.as_dict else loss


@pytest.mark.parametrize("as_dict", [True, False], ids=["dict", "tensor"])
def test_loss_from_training_step_of_a_foreign_module(tmp_path, as_dict):
    """The loss ``training_step`` returns is measured with no extra argument: same sharpness and
    noise scale as with an explicit ``loss_fn``, and the module's logs, metric states and weights
    are those of a run without callbacks."""
    runs = []
    for callbacks in ((), (SharpnessMonitor(every_n_steps=1, max_iter=5), GradientNoiseScaleMonitor(every_n_steps=1)),
                      (SharpnessMonitor(every_n_steps=1, max_iter=5, loss_fn=loss_fn),
                       GradientNoiseScaleMonitor(every_n_steps=1, loss_fn=loss_fn))):
        pl.seed_everything(0)
        model = DictLossNet(as_dict)
        trainer = fit(model, tmp_path, callbacks, max_steps=4)
        logged = {k: float(v) for k, v in trainer.logged_metrics.items()}
        runs.append((callbacks, model.acc._update_count, float(model.acc.compute()), logged,
                     [t.clone() for t in model.state_dict().values()]))
    (_, count_a, acc_a, logged_a, state_a), (found, count_b, acc_b, logged_b, state_b), (given, *_) = runs
    assert count_a == count_b == 4 and acc_a == acc_b
    assert logged_a == {k: v for k, v in logged_b.items() if k.startswith("train/")}
    assert all(torch.equal(a, b) for a, b in zip(state_a, state_b))
    for a, b in zip(found, given):
        assert a.num_measurements == b.num_measurements == 4
        assert a.last_metrics == pytest.approx(b.last_metrics, rel=1e-6)


def test_training_step_without_a_loss_is_named(tmp_path):
    class NoneNet(NoLossNet):
        def training_step(self, batch, batch_idx):
            return {"logits": self(batch[0])}

    with pytest.raises(MisconfigurationException, match="returned a dict with keys \\['logits'\\].*loss_for_batch"):
        fit(NoneNet(), tmp_path, [SharpnessMonitor(every_n_steps=1, max_iter=3)], max_steps=1)


# ----------------------------------------------------------------------------- callback_metrics, no NaN


def test_early_stopping_and_checkpoint_watch_callback_values(tmp_path):
    """``trainer.callback_metrics`` holds the callbacks' values: a real ``EarlyStopping`` and
    ``ModelCheckpoint`` monitor ``sharpness/lambda_max`` and ``gns/b_simple``."""
    sharp = SharpnessMonitor(every_n_epochs=1, max_iter=5)
    gns = GradientNoiseScaleMonitor(every_n_steps=2)
    stop = EarlyStopping(monitor="sharpness/lambda_max", mode="min", stopping_threshold=1e9,
                         check_on_train_epoch_end=True)
    best = ModelCheckpoint(dirpath=tmp_path, monitor="gns/b_simple", mode="max", save_top_k=1)
    pl.seed_everything(0)
    trainer = fit(Net(), tmp_path, [sharp, gns, stop, best], max_epochs=5, enable_checkpointing=True)
    assert trainer.current_epoch == 1 and stop.stopped_epoch == 0  # stopped by the threshold after epoch 1
    assert stop.stopping_reason == EarlyStoppingReason.STOPPING_THRESHOLD
    assert f"sharpness/lambda_max = {sharp.last_metrics['sharpness/lambda_max']}" in stop.stopping_reason_message
    assert float(trainer.callback_metrics["sharpness/lambda_max"]) == sharp.last_metrics["sharpness/lambda_max"]
    assert float(trainer.callback_metrics["gns/b_simple"]) == pytest.approx(gns.last_metrics["gns/b_simple"], rel=1e-6)
    assert best.best_model_path and float(best.best_model_score) > 0


def test_negative_noise_scale_is_clipped_and_flagged():
    cb = GradientNoiseScaleMonitor(ema_decay=0.0)
    cb._recorder = object()  # report the estimator as it is, without measuring
    cb.estimator.update(small_sq=1.0, big_sq=2.0, b_small=8, b_big=16)  # ‖G‖² = 3, tr Σ = -16
    assert cb.measure(None, None, None, 0) == {"gns/b_simple": 0.0, "gns/negative": 1.0, "gns/grad_sq": 3.0,
                                               "gns/trace": -16.0, "gns/count": 1.0}
    cb.estimator.update(small_sq=4.0, big_sq=1.0, b_small=8, b_big=16)  # ‖G‖² = -2: ratio undefined
    metrics = cb.measure(None, None, None, 0)
    assert (metrics["gns/b_simple"], metrics["gns/negative"], metrics["gns/grad_sq"]) == (0.0, 1.0, -2.0)
    cb.estimator.update(small_sq=3.0, big_sq=2.0, b_small=8, b_big=16)  # ‖G‖² = 1, tr Σ = 16
    metrics = cb.measure(None, None, None, 0)
    assert (metrics["gns/b_simple"], metrics["gns/negative"]) == (16.0, 0.0)


def test_non_finite_values_are_never_logged(tmp_path):
    class Broken(SpectralNormMonitor):
        def measure(self, trainer, pl_module, batch, step):
            return {"broken/nan": math.nan, "broken/inf": math.inf, "broken/ok": 1.0}

    logger = RecordingLogger()
    cb = Broken(every_n_steps=1)
    with pytest.warns(UserWarning, match="non-finite values not logged") as record:
        fit(Net(), tmp_path, [cb], logger, max_steps=3)
    assert sum("non-finite" in str(w.message) for w in record) == 1
    assert logger.steps_of("broken/ok") == [0, 1, 2]
    assert not logger.steps_of("broken/nan") and not logger.steps_of("broken/inf")
    assert all(math.isfinite(v) for _, m in logger.scalars for v in m.values())


# ----------------------------------------------------------------------------- constraints


def test_constraint_monitor(tmp_path):
    logger = RecordingLogger()
    fit(ReportingNet(), tmp_path, [ConstraintMonitor(every_n_steps=2)], logger, max_steps=5)
    logged = {k: v for _, m in logger.scalars for k, v in m.items() if k.startswith("constraint/")}
    assert logged["constraint/net.4.weight/inner_iterations"] == 7.0
    assert logged["constraint/max/inner_iterations"] == 7.0
    assert logger.steps_of("constraint/max/constraint") == [0, 2, 4]
    with pytest.warns(UserWarning, match="constraint_report") as record:
        fit(Net(), tmp_path, [ConstraintMonitor(every_n_steps=1)], max_steps=3)
    assert sum("constraint_report" in str(w.message) for w in record) == 1


@pytest.mark.parametrize("tangent", [False, True])
def test_constraint_monitor_says_when_the_solver_never_iterated(tmp_path, tangent):
    """Without tangency MuonSGD + dual ascent is the closed-form clip: 0 iterations, closed_form 1;
    with it the solver iterates: closed_form 0."""
    from lightning_spectral.optim import DualAscentSolver, MuonSGD

    class BudgetedNet(Net):
        def configure_optimizers(self):
            return MuonSGD(self.parameters(), lr=self.lr, spectral_budget=0.01,
                           inner_solver=DualAscentSolver(tangent=tangent, tol=1e-6, max_iters=50))

    logger = RecordingLogger()
    fit(BudgetedNet(), tmp_path, [ConstraintMonitor(every_n_steps=1)], logger, max_steps=3)
    logged = {k: v for _, m in logger.scalars for k, v in m.items() if k.startswith("constraint/")}
    per_layer = {k: v for k, v in logged.items() if k.endswith("/closed_form") and "/max/" not in k}
    # named by the module's parameter names, though the optimizer was built from parameters() (no names)
    assert set(per_layer) == {"constraint/net.0.weight/closed_form", "constraint/net.4.weight/closed_form"}
    assert set(per_layer.values()) == {0.0 if tangent else 1.0}
    assert (logged["constraint/max/inner_iterations"] > 0) == tangent
    assert logged["constraint/max/closed_form"] == (0.0 if tangent else 1.0)


# ----------------------------------------------------------------------------- arguments and state


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: SpectralNormMonitor(every_n_steps=0), "every_n_steps must be a positive int"),
        (lambda: SpectralNormMonitor(every_n_steps=True), "every_n_steps"),
        (lambda: SpectralNormMonitor(every_n_steps=5, every_n_epochs=1), "either every_n_steps or every_n_epochs"),
        (lambda: SpectralNormMonitor(method="qr"), "method must be one of"),
        (lambda: SpectralNormMonitor(blocks={"*.q_proj": 0}), r"blocks\['\*\.q_proj'\] must be a positive int"),
        (lambda: SpectralNormMonitor(blocks="heads"), "blocks must be None, 'auto' or a dict"),
        (lambda: SharpnessMonitor(tol=0), "tol must be > 0"),
        (lambda: SharpnessMonitor(loss_fn="nope"), "loss_fn must be callable"),
        (lambda: GradientNoiseScaleMonitor(num_chunks=1), "num_chunks must be at least 2"),
        (lambda: GradientNoiseScaleMonitor(ema_decay=1.5), "decay"),
        (lambda: GradientNoiseScaleMonitor(mode="fast"), "mode must be one of"),
    ],
)
def test_argument_validation(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_defaults_and_schedule_switch():
    assert SpectralNormMonitor().every_n_steps == 50 and SharpnessMonitor().every_n_steps == 100
    cb = SharpnessMonitor(every_n_epochs=2)
    assert cb.every_n_steps is None and cb.every_n_epochs == 2


def test_state_round_trips_through_a_checkpoint(tmp_path):
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = [SpectralNormMonitor(every_n_steps=2), GradientNoiseScaleMonitor(every_n_steps=1)]
    fit(Net(), tmp_path, [*first, ckpt_cb], max_steps=4, enable_checkpointing=True)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)  # plain tensors and values only
    assert {first[0].state_key, first[1].state_key} <= set(checkpoint["callbacks"])
    second = [SpectralNormMonitor(every_n_steps=2), GradientNoiseScaleMonitor(every_n_steps=1)]
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=False, callbacks=second, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=False)
    trainer.fit(Net(), ckpt_path=tmp_path / "last.ckpt")  # restores, then stops: max_steps already reached
    for a, b in zip(first, second):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and sa["last_step"] == sb["last_step"] == a._last_step
    assert second[1].estimator.state_dict() == first[1].estimator.state_dict()
    assert second[1].estimator.count == 4
    va, vb = first[0].tracker.vectors, second[0].tracker.vectors
    assert va.keys() == vb.keys() and all(torch.equal(va[k].cpu(), vb[k]) for k in va)


def test_yaml_short_names_resolve():
    from jsonargparse import ArgumentParser

    import lightning_spectral.callbacks  # noqa: F401  (short names resolve for imported classes)

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[Callback])
    cfg = parser.parse_args(['--callbacks=[{"class_path": "SpectralNormMonitor", "init_args": {"every_n_steps": 7}},'
                             ' {"class_path": "GradientNoiseScaleMonitor", "init_args": {"ema_decay": 0.9}}]'])
    spectral, gns = parser.instantiate(cfg).callbacks
    assert isinstance(spectral, SpectralNormMonitor) and spectral.every_n_steps == 7
    assert gns.estimator.decay == 0.9
    for blocks in ('"auto"', '{"*.q_proj": 32, "*.k_proj": 32}'):  # the per-head option from a config
        spec = f'[{{"class_path": "SpectralNormMonitor", "init_args": {{"blocks": {blocks}}}}}]'
        cfg = parser.parse_args([f"--callbacks={spec}"])
        assert parser.instantiate(cfg).callbacks[0].blocks == json.loads(blocks)
