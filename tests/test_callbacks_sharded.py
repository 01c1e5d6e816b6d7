"""The diagnostic callbacks on a network sharded by Lightning's ``ModelParallelStrategy`` (FSDP2), 2 CPU
gloo processes.

A hang is the failure that matters: a callback that gathers or runs a forward pass on rank 0 alone
would leave the other rank waiting. So each callback either measures on every rank and logs what a
one-process fit logs (``SpectralNormMonitor``, ``ConstraintMonitor``, ``EpochRecorder``), or raises its
clear error on both ranks (``SharpnessMonitor``, ``GradientNoiseScaleMonitor``). Every run has a
timeout, so a hang fails the test. Both ranks read the same batches, so the sharded fit takes the
one-process steps and the logged values must agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

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


    def callbacks(case):
        if case == "measure":
            return [SpectralNormMonitor(every_n_steps=1, method="svd", log_histograms=False),
                    SpectralNormMonitor(every_n_steps=2, method="power", max_iter=50, log_histograms=False),
                    ConstraintMonitor(every_n_steps=1), EpochRecorder()]
        return [SharpnessMonitor(every_n_steps=1)] if case == "sharpness" else [GradientNoiseScaleMonitor(every_n_steps=1)]


    if __name__ == "__main__":
        torch.set_num_threads(1)
        case, sharded, out = sys.argv[1], sys.argv[2] == "sharded", sys.argv[3]
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x, y = torch.tensor(x[:128] / 16.0, dtype=torch.float32), torch.tensor(y[:128])
        loader = torch.utils.data.DataLoader([(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)], batch_size=None)
        torch.manual_seed(0)
        model = SpectralModule(MLP(in_features=64, num_classes=10, hidden_sizes=[32, 32]),
                               optimizer=partial(O.SpectralBall, lr=0.05))
        extra = dict(devices=2, strategy=ModelParallelStrategy()) if sharded else dict(devices=1)
        logger = Recorder()
        cbs = callbacks(case)
        trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=3, num_sanity_val_steps=0,
                            use_distributed_sampler=False, logger=logger, callbacks=cbs, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, **extra)
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        try:
            trainer.fit(model, loader)
        except Exception as error:  # noqa: BLE001 - the test reads the message
            json.dump({"error": f"{type(error).__name__}: {error}"}, open(f"{out}.rank{rank}.json", "w"))
            sys.exit(0)
        result = {"rows": logger.rows, "steps": trainer.global_step,
                  "types": sorted({type(p).__name__ for p in model.parameters()}),
                  "final_norms": cbs[-1].final["spectral_norms"] if case == "measure" else {}}
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


@pytest.mark.parametrize("case,callback", [("sharpness", "SharpnessMonitor"), ("gns", "GradientNoiseScaleMonitor")])
def test_rank_zero_callbacks_refuse_sharded_parameters_on_every_rank(tmp_path, case, callback):
    """The callbacks whose measurement is a forward/backward on rank 0 alone raise, on both ranks, an
    error naming the callback, the strategy and the fix, instead of hanging."""
    ranks = _fit(tmp_path, case, "sharded")
    for rank in ranks:
        message = rank.get("error", "")
        assert f"{callback} does not support sharded (DTensor) parameters" in message, rank
        assert "ModelParallelStrategy" in message and "DDPStrategy" in message, message
