"""The diagnostic callbacks on a network sharded by Lightning's ``ModelParallelStrategy`` (FSDP2), 2 CPU
gloo processes.

A hang is the failure that matters: a callback that gathers or runs a forward pass on rank 0 alone
would leave the other rank waiting. So each callback measures on every rank and logs what a
one-process fit logs (``SpectralNormMonitor``, ``ConstraintMonitor``, ``EpochRecorder``,
``SharpnessMonitor``), or, with its ranks' own batches, what one process computes from the same
batches (``GradientNoiseScaleMonitor``). Every run has a timeout, so a hang fails the test. In the
other cases both ranks read the same batches, so the sharded fit takes the one-process steps and the
logged values must agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

TOL = 1e-5

SCRIPT = textwrap.dedent(
    '''
    """Written by tests/test_callbacks_sharded.py: one fit with the callbacks of a case."""
    import json
    import os
    import sys
    from functools import partial

    import lightning.pytorch as L
    import torch
    from lightning.pytorch.loggers import Logger
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_spectral import optim as O
    from lightning_spectral.callbacks import (
        ConstraintMonitor,
        EpochRecorder,
        GradientNoiseScaleMonitor,
        SharpnessMonitor,
        SpectralNormMonitor,
    )
    from lightning_spectral.diagnostics import grad_sq_norms
    from lightning_spectral.models.mlp import MLP
    from lightning_spectral.module import SpectralModule


    class Recorder(Logger):
        """Keeps every logged scalar (rank 0 only writes)."""

        def __init__(self):
            super().__init__()
            self.rows = []

        name = "recorder"
        version = 0

        def log_metrics(self, metrics, step=None):
            self.rows.append([step, {k: float(v) for k, v in metrics.items()}])

        def log_hyperparams(self, *args, **kwargs):
            pass


    class Reference(L.Callback):
        """At the first batch, one process's squared gradient norms of the two ranks' halves, on a plain copy of
        the gathered weights (every rank gathers; the values are the same on each)."""

        def __init__(self):
            self.values = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx:
                return
            full = {n: p.full_tensor().detach() for n, p in pl_module.net.named_parameters()}
            net = MLP(in_features=64, num_classes=10, hidden_sizes=[32, 32])
            net.load_state_dict(full)
            self.values = dict(zip(("small", "big"), grad_sq_norms(
                lambda b: torch.nn.functional.cross_entropy(net(b[0]), b[1]), list(net.parameters()),
                [(x[:16], y[:16]), (x[16:32], y[16:32])])))


    def callbacks(case):
        if case == "measure":
            return [SpectralNormMonitor(every_n_steps=1, method="svd", log_histograms=False),
                    SpectralNormMonitor(every_n_steps=2, method="power", max_iter=50, log_histograms=False),
                    ConstraintMonitor(every_n_steps=1), EpochRecorder()]
        if case == "sharpness":  # tol=1e-12: every run takes all max_iter steps, so the Ritz values are comparable
            return [SharpnessMonitor(every_n_steps=1, method="lanczos", max_iter=20, tol=1e-12, warm_start=False)]
        return [Reference(), GradientNoiseScaleMonitor(every_n_steps=1, ema_decay=0.0)]


    if __name__ == "__main__":
        torch.set_num_threads(1)
        case, sharded, out = sys.argv[1], sys.argv[2] == "sharded", sys.argv[3]
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x, y = torch.tensor(x[:128] / 16.0, dtype=torch.float32), torch.tensor(y[:128])
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]
        if case == "gns":  # each rank its own 16 examples of every 32, so the local gradients differ
            batches = [(bx[16 * rank:16 * rank + 16], by[16 * rank:16 * rank + 16]) for bx, by in batches]
        loader = torch.utils.data.DataLoader(batches, batch_size=None)
        torch.manual_seed(0)
        model = SpectralModule(MLP(in_features=64, num_classes=10, hidden_sizes=[32, 32]),
                               optimizer=partial(O.SpectralBall, lr=0.05))
        # data_parallel_size=2: the default ("auto") gives 2 tensor-parallel ranks and a data-parallel mesh of 1,
        # over which fully_shard shards nothing and reduces nothing.
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        extra = dict(devices=2, strategy=strategy) if sharded else dict(devices=1)
        logger = Recorder()
        cbs = callbacks(case)
        trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=3, num_sanity_val_steps=0,
                            use_distributed_sampler=False, logger=logger, callbacks=cbs, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, **extra)
        try:
            trainer.fit(model, loader)
        except Exception as error:  # noqa: BLE001 - the test reads the message
            json.dump({"error": f"{type(error).__name__}: {error}"}, open(f"{out}.rank{rank}.json", "w"))
            sys.exit(0)
        result = {"rows": logger.rows, "steps": trainer.global_step,
                  "shard_numel": sum(p.to_local().numel() for p in model.parameters()) if sharded else 0,
                  "numel": sum(p.numel() for p in model.parameters()),
                  "types": sorted({type(p).__name__ for p in model.parameters()}),
                  "final_norms": cbs[-1].final["spectral_norms"] if case == "measure" else {}, "reference": cbs[0].values if case == "gns" else {}}
        json.dump(result, open(f"{out}.rank{rank}.json", "w"))
    '''
)


def _fit(tmp_path, case: str, mode: str) -> list[dict]:
    script, out = tmp_path / "fit.py", tmp_path / f"{case}_{mode}"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(script), case, mode, str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # a hang fails here
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = 2 if mode == "sharded" else 1
    return [json.loads((tmp_path / f"{case}_{mode}.rank{r}.json").read_text()) for r in range(ranks)]


def _by_step(rows: list) -> dict:
    merged: dict = {}
    for step, metrics in rows:
        merged.setdefault(step, {}).update(metrics)
    return merged


def test_measuring_callbacks_log_the_one_process_values(tmp_path):
    """SpectralNormMonitor (svd and power), ConstraintMonitor and EpochRecorder on sharded weights: every
    rank gathers, rank 0 logs the same spectral norms, stable ranks and constraint reports as one process."""
    sharded, (plain,) = _fit(tmp_path, "measure", "sharded"), _fit(tmp_path, "measure", "plain")
    assert all("error" not in r for r in sharded), sharded
    assert sharded[0]["types"] == ["DTensor"] and plain["types"] == ["Parameter"]
    assert sum(r["shard_numel"] for r in sharded) == plain["numel"]  # really split over the two ranks
    assert sharded[0]["steps"] == plain["steps"] == 3
    got, want = _by_step(sharded[0]["rows"]), _by_step(plain["rows"])
    assert got.keys() == want.keys() and len(want) >= 3
    compared = 0
    for step, metrics in want.items():
        diagnostic = {k for k in metrics if k.split("/")[0] in ("spectral_norm", "stable_rank", "constraint")}
        assert diagnostic <= got[step].keys(), (step, sorted(diagnostic - got[step].keys()))
        for key in diagnostic:
            assert abs(got[step][key] - metrics[key]) <= TOL * max(1.0, abs(metrics[key])), (step, key)
            compared += 1
    assert compared >= 20
    assert any(k.startswith("constraint/") for m in want.values() for k in m)
    assert any(k == "spectral_norm/max" and v > 0 for m in want.values() for k, v in m.items())
    for rank in sharded:  # EpochRecorder's final norms gathered on both ranks
        assert rank["final_norms"].keys() == plain["final_norms"].keys() and plain["final_norms"]
        for name, sigma in plain["final_norms"].items():
            assert abs(rank["final_norms"][name] - sigma) <= TOL * max(1.0, sigma), name


@pytest.mark.slow  # two fits (3 processes): about 20 s of CPU, over the default suite's 15 s
def test_sharpness_monitor_logs_the_one_process_values(tmp_path):
    """SharpnessMonitor on FSDP2 shards (exact double backward on the network unsharded for the measurement,
    vectors as shards, inner products summed over the ranks; both ranks read the same batch, so the ranks'
    mean loss is the one-process loss) logs the one-process λ_max and the AdamW fallback's preconditioned
    sharpness: 20 Lanczos steps from the same start vector on the same operator, apart from float32
    round-off (20·64·eps relative). Training continues on the resharded network (3 steps)."""
    sharded, (plain,) = _fit(tmp_path, "sharpness", "sharded"), _fit(tmp_path, "sharpness", "plain")
    assert all("error" not in r for r in sharded), sharded
    got, want = _by_step(sharded[0]["rows"]), _by_step(plain["rows"])
    keys = {k for m in want.values() for k in m if k.startswith("sharpness/")}
    assert "sharpness/lambda_max" in keys and any(k.startswith("sharpness/preconditioned/") for k in keys), keys
    bound = 20 * 64 * torch.finfo(torch.float32).eps
    compared = 0
    for step, metrics in want.items():
        for key in keys & metrics.keys():
            if key.startswith("sharpness/hvp_count"):
                assert got[step][key] == metrics[key]
                continue
            assert abs(got[step][key] - metrics[key]) <= bound * abs(metrics[key]), (step, key, got[step][key])
            compared += 1
    assert compared >= 6 and len(want) == 3 and sharded[0]["steps"] == plain["steps"] == 3


def test_noise_scale_monitor_measures_each_ranks_local_gradient(tmp_path):
    """GradientNoiseScaleMonitor under FSDP2 ("fsdp" mode, auto): each rank's 16 examples are the small
    batch, both ranks' 32 the big one. Its first logged ‖G‖² and tr Σ (ema_decay=0: that step's
    measurement) give back ‖G_16‖² = ‖G‖² + tr Σ/16 and ‖G_32‖² = ‖G‖² + tr Σ/32, which equal one process's
    grad_sq_norms on the same two halves to float32 round-off of the gradient sums and of that inversion."""
    ranks = _fit(tmp_path, "gns", "sharded")
    assert all("error" not in r for r in ranks), ranks
    rows = {s: m for s, m in _by_step(ranks[0]["rows"]).items() if "gns/count" in m}
    assert [rows[s]["gns/count"] for s in sorted(rows)] == [1.0, 2.0, 3.0]
    first = rows[min(rows)]
    grad_sq, trace = first["gns/grad_sq"], first["gns/trace"]
    ref = ranks[0]["reference"]
    assert ref == ranks[1]["reference"]
    tol = 256 * torch.finfo(torch.float32).eps * ref["small"]
    assert abs(grad_sq + trace / 16 - ref["small"]) <= tol, (first, ref)
    assert abs(grad_sq + trace / 32 - ref["big"]) <= tol, (first, ref)
    assert ref["small"] > ref["big"] > 0
    if grad_sq > 0:
        assert first["gns/b_simple"] == pytest.approx(trace / grad_sq, rel=1e-6) and first["gns/negative"] == 0
    else:  # one pair of 16-example halves: the unbiased ‖G‖² estimate may be negative
        assert first["gns/b_simple"] == 0 and first["gns/negative"] == 1
