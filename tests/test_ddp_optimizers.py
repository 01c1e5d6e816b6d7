"""Every optimizer keeps the DDP replicas bit-identical (issue 8; anchors §2.6, §2.9).

The real CLI (``python -m lightning_spectral fit``) runs the quick start for a few steps on 2 CPU
processes (gloo, Lightning's popen ``ddp`` launcher, which re-executes ``python -m`` for rank 1).
A callback of this test, written into ``tmp_path`` and put on ``PYTHONPATH`` so that both ranks import
it, all-gathers every parameter (flattened, float64: exact for float32 weights) at the start and at
the end of training; rank 0 compares the ranks bit for bit and writes a JSON report.

Run: ``.venv/bin/python -m pytest tests/test_ddp_optimizers.py -m slow``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from lightning_spectral.optim import optimizer_entries

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
QUICKSTART = CONFIGS / "quickstart.yaml"
OVERLAYS = sorted((CONFIGS / "optim").glob("*.yaml"))
MAX_STEPS = 6


def _overlay_classes() -> set[str]:
    return {yaml.safe_load(path.read_text())["model"]["init_args"]["optimizer"]["class_path"].rsplit(".", 1)[-1]
            for path in OVERLAYS}


# Every shipped overlay, and each registry entry no overlay runs, in its test configuration.
ENTRIES = [entry for entry in optimizer_entries() if entry.cls.__name__ not in _overlay_classes()]

CHECKSUM_MODULE = textwrap.dedent(
    '''
    """Written by tests/test_ddp_optimizers.py; imported by every DDP rank through PYTHONPATH."""
    import json

    import torch
    from lightning.pytorch.callbacks import Callback


    def _gather(pl_module):
        names, flat = [], []
        for name, p in pl_module.named_parameters():
            names.append((name, p.numel()))
            flat.append(p.detach().reshape(-1).to(torch.float64))
        local = torch.cat(flat)
        gathered = pl_module.all_gather(local)  # (world_size, n) under DDP, (n,) on one process
        return names, local, gathered.reshape(-1, local.numel())


    def _per_tensor(names, vector):
        out, start = {}, 0
        for name, n in names:
            chunk = vector[start : start + n]
            out[name] = [float(chunk.sum()), float((chunk * chunk).sum())]
            start += n
        return out


    class ParamChecksum(Callback):
        """All-gathers the parameters at train start and end; rank 0 writes the comparison to ``path``."""

        def __init__(self, path: str) -> None:
            self.path = path

        def on_train_start(self, trainer, pl_module) -> None:
            self.names, self.start_local, self.start = _gather(pl_module)

        def on_train_end(self, trainer, pl_module) -> None:
            names, end_local, end = _gather(pl_module)
            if not trainer.is_global_zero:
                return
            bits = end.view(torch.int64)
            start_bits = self.start.view(torch.int64)
            report = {
                "world_size": trainer.world_size,
                "global_step": trainer.global_step,
                "n_params": end_local.numel(),
                "start_identical": all(torch.equal(start_bits[0], b) for b in start_bits),
                "end_identical": all(torch.equal(bits[0], b) for b in bits),
                "max_abs_diff": float((end - end[0]).abs().max()),
                "differing_tensors": [],
                "changed": not torch.equal(self.start[0], end[0]),
                "ranks": [_per_tensor(names, row) for row in end],
            }
            start = 0
            for name, n in names:
                if not all(torch.equal(bits[0, start : start + n], b[start : start + n]) for b in bits):
                    report["differing_tensors"].append(name)
                start += n
            with open(self.path, "w") as f:
                json.dump(report, f, indent=1)
    '''
)


def _ids(case) -> str:
    return "sgd" if case is None else case.stem if isinstance(case, Path) else f"registry:{case.name}"


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="2-process gloo DDP through the popen launcher")
@pytest.mark.parametrize("overlay", [None, *OVERLAYS, *ENTRIES], ids=_ids)
def test_ddp_ranks_stay_bit_identical(tmp_path: Path, overlay) -> None:
    (tmp_path / "ddp_checksum.py").write_text(CHECKSUM_MODULE)
    report_path = tmp_path / "checksums.json"
    # Only the test's callback: the diagnostics and ModelCheckpoint are dropped to keep each run short.
    callbacks = json.dumps([{"class_path": "ddp_checksum.ParamChecksum", "init_args": {"path": str(report_path)}}])
    configs = ["--config", str(QUICKSTART)]
    if isinstance(overlay, Path):
        configs += ["--config", str(overlay)]
    elif overlay is not None:  # a registry entry: its test configuration as the optimizer
        configs += [f"--model.optimizer={json.dumps(overlay.config())}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "1")  # two ranks on a small CPU box
    result = subprocess.run(
        [sys.executable, "-m", "lightning_spectral", "fit", *configs,
         "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
         f"--trainer.max_steps={MAX_STEPS}", "--trainer.logger=false", f"--trainer.callbacks={callbacks}",
         "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert report["world_size"] == 2
    assert report["global_step"] == MAX_STEPS
    assert report["start_identical"], "the ranks started from different weights"
    assert report["changed"], "training did not change the weights"
    assert report["end_identical"], (
        f"ranks differ after {MAX_STEPS} steps (max |Δ| = {report['max_abs_diff']:.3e}) "
        f"in {report['differing_tensors']}"
    )
    assert report["ranks"][0] == report["ranks"][1]
