"""The ``lm`` report section on a fake results set with hand-computed answers, and the shipped LM studies."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lightning_spectral.experiments.report import SECTIONS, group_results
from lightning_spectral.experiments.report.lm import (
    first_crossing, optimizer_fraction, section_lm, trajectory, value_at,
)
from lightning_spectral.experiments.spec import Run, Study, expand, load_study

ROOT = Path(__file__).resolve().parents[1]


def history(losses, seconds, step_ms=10.0, every=25):
    return [{"epoch": i + 1, "step": every * (i + 1), "val_loss": loss, "time": t, "step_time_ms": step_ms}
            for i, (loss, t) in enumerate(zip(losses, seconds))]


def result(optimizer, lr, seed, losses=None, seconds=None, step_ms=10.0, status="finished"):
    run = Run(f"optimizer={optimizer}__lr={lr}__seed={seed}", {"optimizer": optimizer, "lr": str(lr)},
              {"optimizer": optimizer, "lr": lr}, seed, {})
    hist = history(losses, seconds, step_ms) if losses else []
    return run, {"seed": seed, "status": status, "history": hist}


def fake_results():
    """AdamW: lrs 1e-3 and 1e-2 (diverged) with seed 0, 3e-3 with seeds 0-2, every evaluation 2 s,
    optimizer steps 20 ms. Muon: 0.02 with seeds 0-2 (seed 0 never reaches 1.6, seed 2 is below it
    at the first evaluation), 0.05 with seed 0 only but the lowest final loss."""
    two = [2.0] * 4
    return [
        result("AdamW", 0.001, 0, [3.0, 2.5, 2.0, 1.4], two, 20.0),
        result("AdamW", 0.003, 0, [3.0, 2.0, 1.5, 1.2], two, 20.0),
        result("AdamW", 0.003, 1, [3.0, 2.2, 1.4, 1.1], two, 20.0),
        result("AdamW", 0.003, 2, [3.0, 1.8, 1.4, 1.3], two, 20.0),
        result("AdamW", 0.01, 0, [3.0, math.nan], [2.0, 2.0], 20.0, status="diverged"),
        result("Muon", 0.02, 0, [2.5, 1.9, 1.7, 1.65], [1.25] * 4),
        result("Muon", 0.02, 1, [2.5, 1.7, 1.5, 1.4], [1.5] * 4),
        result("Muon", 0.02, 2, [1.5, 1.4, 1.3, 1.2], [1.5] * 4),
        result("Muon", 0.05, 0, [2.0, 1.5, 1.2, 1.0], [1.5] * 4),
    ]


def study():
    return Study(name="lmfake", kind="train", path=None, base={}, seeds=[0], grids=[])


def test_first_crossing_interpolates_flags_the_first_point_and_misses() -> None:
    steps, losses = [25.0, 50.0, 75.0, 100.0], [3.0, 2.0, 1.5, 1.2]
    assert first_crossing(steps, losses, 1.6) == (pytest.approx(50 + 25 * 0.4 / 0.5), True)  # 70
    assert first_crossing(steps, losses, 2.0) == (50.0, True)  # exactly at an evaluation
    assert first_crossing(steps, losses, 3.5) == (25.0, False)  # already below at the first: an upper bound
    x, exact = first_crossing(steps, losses, 1.0)
    assert math.isnan(x) and exact


def test_value_at_interpolates_inside_and_is_nan_outside() -> None:
    xs, ys = [2.0, 4.0, 6.0, 8.0], [3.0, 2.0, 1.5, 1.2]
    assert value_at(xs, ys, 5.0) == pytest.approx(1.75)
    assert value_at(xs, ys, 8.0) == pytest.approx(1.2) and value_at(xs, ys, 2.0) == pytest.approx(3.0)
    assert math.isnan(value_at(xs, ys, 1.0)) and math.isnan(value_at(xs, ys, 8.5)) and math.isnan(value_at([], [], 1))


def test_trajectory_and_optimizer_fraction() -> None:
    hist = history([3.0, math.nan, 1.5], [2.0, 3.0, 5.0], step_ms=20.0)
    assert trajectory(hist) == ([25.0, 75.0], [2.0, 10.0], [3.0, 1.5])  # the NaN row's time still counts
    assert optimizer_fraction(hist) == pytest.approx(0.020 * 75 / 10.0)
    assert math.isnan(optimizer_fraction([{"step": 25, "time": 1.0}]))


def test_section_lm_on_a_fake_study(tmp_path: Path) -> None:
    assert SECTIONS["lm"] is section_lm
    groups = group_results(fake_results())
    text, figures = section_lm(study(), groups, tmp_path, {"target_loss": 1.6})
    assert figures == ["lmfake_val_loss.png", "lmfake_lr_sweep_loss.png"]
    assert all((tmp_path / f).exists() and (tmp_path / f).with_suffix(".svg").exists() for f in figures)
    table = json.loads((tmp_path / "lm_table.json").read_text())
    assert table["equal_time_s"] == pytest.approx(5.0)  # Muon seed 0: 4 × 1.25 s, the shortest run
    adamw, muon = table["rows"]
    assert adamw["lr"] == 0.003 and adamw["seeds"] == [0, 1, 2]  # the lr with the most seeds
    assert adamw["final_val_loss"]["mean"] == pytest.approx(1.2)
    assert adamw["final_val_loss"]["std"] == pytest.approx(0.1)
    assert adamw["final_val_bpb"]["mean"] == pytest.approx(1.2 / math.log(2))
    assert adamw["steps_to_target"] == pytest.approx([70.0, 50 + 25 * 0.6 / 0.8, 50 + 25 * 0.2 / 0.4])
    assert adamw["seconds_to_target"] == pytest.approx([4 + 2 * 0.4 / 0.5, 4 + 2 * 0.6 / 0.8, 4 + 2 * 0.2 / 0.4])
    # at 5 s: halfway between the evaluations at 4 s and 6 s of each seed
    assert adamw["val_loss_at_equal_time"]["mean"] == pytest.approx((1.75 + 1.8 + 1.6) / 3)
    assert adamw["optimizer_time_fraction"]["mean"] == pytest.approx(0.020 * 100 / 8.0)
    assert muon["lr"] == 0.02 and muon["seeds"] == [0, 1, 2]
    assert math.isnan(muon["steps_to_target"][0])  # 1.65 at the end: not reached
    assert muon["steps_to_target"][1:] == pytest.approx([62.5, 25.0])
    assert muon["seconds_to_target"][1:] == pytest.approx([3.0 + 1.5 * 0.5, 1.5])
    assert muon["val_loss_at_equal_time"]["mean"] == pytest.approx((1.65 + (1.5 + (1.4 - 1.5) * (5 - 4.5) / 1.5)
                                                                     + (1.3 + (1.2 - 1.3) * (5 - 4.5) / 1.5)) / 3)
    assert muon["optimizer_time_fraction"]["mean"] == pytest.approx((0.01 * 100 / 5 + 2 * 0.01 * 100 / 6) / 3)
    main = text.split("### Learning-rate sweep")[0]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in main.splitlines() if line.startswith("| ")}
    assert "| ≤ 44 ± 27 (2/3 reached) | ≤ 2.6 ± 1.6 (2/3 reached) |" in rows["Muon"]  # seed 2: an upper bound
    assert "| 67 ± 4 | 5.4 ± 0.3 |" in rows["AdamW"]  # steps (70, 68.75, 62.5) and seconds (5.6, 5.5, 5.0)
    assert "1.200 ± 0.100" in rows["AdamW"] and "25.0 ± 0.0" in rows["AdamW"]  # loss; optimizer % of time
    sweep = next(line for line in text.splitlines() if line.startswith("| AdamW | 0.001:"))
    assert "0.001: 1.400 · **0.003: 1.200** · 0.01: diverged" in sweep and sweep.endswith("|  |")
    muon_sweep = next(line for line in text.splitlines() if line.startswith("| Muon | 0.02:"))
    assert "**0.05: 1.000**" in muon_sweep and "not the setting with the most seeds" in muon_sweep
    # the winners: AdamW at equal steps (1.2 ± 0.1 against Muon's 1.417 ± 0.225: 1.5 standard errors), Muon at
    # equal time (1.461 against 1.717 at 5 s); what would change it, read from these runs
    wins = table["winners"]
    assert wins["equal_steps"]["optimizer"] == "AdamW" and wins["equal_steps"]["runner_up"] == "Muon"
    muon_finals = [1.65, 1.4, 1.2]
    se = math.sqrt(0.1 ** 2 / 3 + (sum((x - sum(muon_finals) / 3) ** 2 for x in muon_finals) / 2) / 3)
    assert wins["equal_steps"]["gap"] == pytest.approx(sum(muon_finals) / 3 - 1.2)
    assert wins["equal_steps"]["standard_errors"] == pytest.approx((sum(muon_finals) / 3 - 1.2) / se)
    assert wins["equal_time"]["optimizer"] == "Muon" and wins["equal_time"]["runner_up"] == "AdamW"
    winners = text.split("### Winners")[1].split("### Learning-rate sweep")[0]
    assert "**Equal steps (final validation loss): AdamW**, 1.200 ± 0.100 (n = 3), ahead of Muon, 1.417 ± 0.225 " \
           "(n = 3), by 0.217 nats (1.5 standard errors)." in winners
    assert "**Equal time (validation loss at 5 s): Muon**" in winners
    changes = table["what_would_change_it"]
    assert any(c.startswith("Seeds (equal steps): AdamW's lead over Muon is 1.5 standard errors") for c in changes)
    assert "Sweep (Muon): its best learning rate 0.05 is the largest swept, so its optimum may lie beyond it, " \
           "with a lower loss." in changes
    assert "Sweep (Muon): its seeds ran at lr 0.02, but the sweep's best is lr 0.05." in changes
    assert not any(c.startswith("Sweep (AdamW)") for c in changes)  # 0.003 lies inside 0.001 … 0.01
    # the last two evaluations: AdamW's mean falls 0.2333 per 25 steps, Muon's 0.0833: no catching up
    assert any(c.startswith("Horizon: over the last quarter of the run Muon's loss falls no faster") for c in changes)
    assert any("the winners differ (AdamW at equal steps, Muon at equal time)" in c for c in changes)
    assert all(f"- {c}" in winners for c in changes)


def test_winners_with_a_runner_up_that_catches_up_and_settings_beside_the_lr(tmp_path: Path) -> None:
    """B trails A by 0.05 at the end but falls 0.25 per 25 steps against A's 0.1: it catches up in
    0.05 / (0.01 − 0.004) = 8 steps at those rates; the lead is 3.9 standard errors, so seeds would not reverse
    it. A is swept over lr × beta2: the sweep labels each entry with its beta2, and its edge is read per beta2."""
    def run(opt, lr, seed, losses, seconds, beta2=None):
        axes = {"optimizer": opt, "lr": str(lr), **({"beta2": beta2} if beta2 else {})}
        r = Run("__".join(f"{k}={v}" for k, v in axes.items()) + f"__seed={seed}", axes,
                {**axes, "lr": lr}, seed, {})
        return r, {"seed": seed, "status": "finished", "history": history(losses, seconds)}

    results = [run("A", 0.01, seed, [2.0 + d, 1.5 + d, 1.4 + d, 1.3 + d], [1.0] * 4, "0.95")
               for seed, d in enumerate((-0.01, 0.0, 0.01))]
    results += [run("A", 0.01, 0, [2.0, 1.8, 1.7, 1.6], [1.0] * 4, "0.99"),
                run("A", 0.02, 0, [2.0, 1.9, 1.8, 1.7], [1.0] * 4, "0.99")]
    results += [run("B", 0.05, seed, [2.5 + d, 2.0 + d, 1.6 + d, 1.35 + d], [2.0] * 4)
                for seed, d in enumerate((-0.02, 0.0, 0.02))]
    text, _ = section_lm(study(), group_results(results), tmp_path, {"target_loss": 1.0})
    table = json.loads((tmp_path / "lm_table.json").read_text())
    wins, changes = table["winners"], table["what_would_change_it"]
    assert wins["equal_steps"]["optimizer"] == "A" and wins["equal_steps"]["gap"] == pytest.approx(0.05)
    se = math.sqrt(0.01 ** 2 / 3 + 0.02 ** 2 / 3)
    assert wins["equal_steps"]["standard_errors"] == pytest.approx(0.05 / se)  # 3.9
    assert wins["equal_time"]["optimizer"] == "A" and wins["equal_time"]["gap"] == pytest.approx(2.0 - 1.3)  # at 4 s
    assert not any(c.startswith("Seeds") for c in changes)
    assert any(c.startswith("Horizon: over the last quarter of the run B's loss falls faster than A's (-10.000 "
                            "against -4.000 nats per 1000 steps): at those rates it would catch up after about 8 "
                            "more steps (the run is 100)") for c in changes)
    assert any(c.startswith("Budget: the same optimizer wins both.") for c in changes)
    # A's best at beta2 0.99 is lr 0.01, the smallest of that beta2's lrs: but the best of A is at beta2 0.95
    assert not any(c.startswith("Sweep (A)") for c in changes)
    sweep = next(line for line in text.splitlines() if line.startswith("| A | **0.01 ("))
    assert "| A | 0.01 (beta2 0.95) | 3 | 1.300 ± 0.010 |" in text and table["rows"][0]["settings"] == "beta2 0.95"
    assert "**0.01 (beta2 0.95): 1.290**" in sweep and "0.01 (beta2 0.99): 1.600 · 0.02 (beta2 0.99): 1.700" in sweep


def test_a_diverged_run_does_not_set_the_equal_time(tmp_path: Path) -> None:
    results = [result("Muon", 0.02, 0, [2.5, 1.9, 1.7, 1.65], [1.25] * 4),
               result("Muon", 0.02, 1, [2.5, math.nan], [0.5, 0.5], status="diverged")]
    text, _ = section_lm(study(), group_results(results), tmp_path, {"target_loss": 1.6})
    table = json.loads((tmp_path / "lm_table.json").read_text())
    assert table["equal_time_s"] == pytest.approx(5.0) and table["rows"][0]["diverged"] == 1
    assert "| Muon | 0.02 | 2 (1 diverged) | 1.650 |" in text  # the final loss of the run that finished


def test_section_lm_needs_a_target_and_the_optimizer_axis(tmp_path: Path) -> None:
    groups = group_results(fake_results())
    with pytest.raises(ValueError, match="needs target_loss"):
        section_lm(study(), groups, tmp_path, {})
    with pytest.raises(ValueError, match="has no axis 'method'; name the optimizer axis with method_axis"):
        section_lm(study(), groups, tmp_path, {"target_loss": 1.6, "method_axis": "method"})


def test_the_cpu_lm_study_shares_the_sweep_run_of_the_best_lr() -> None:
    spec = load_study(ROOT / "configs" / "studies" / "text" / "lm.yaml")
    runs = expand(spec)
    by_group: dict[str, list[int]] = {}
    for run in runs:
        by_group.setdefault(run.group, []).append(run.seed)
    optimizers = {run.axes["optimizer"] for run in runs}
    seeded = {"AdamW", "Muon", "MuonAdamW", "ManifoldMuon", "SpectralBall", "BlockStiefel"}
    swept_only = {"MuonSphere", "SOAP", "PSGD-Kron"}  # their seeds 1 and 2 wait for the sweep's best lr
    assert optimizers == seeded | swept_only and len(runs) == 6 * (3 + 2) + 3 * 3
    for name in optimizers:
        seeds = sorted(sorted(s) for g, s in by_group.items() if g.startswith(f"optimizer={name},"))
        # three swept lrs, one of them with seeds 0, 1, 2 where the best lr is known
        assert seeds == ([[0], [0], [0, 1, 2]] if name in seeded else [[0], [0], [0]]), name
    section = next(s for s in spec.report["sections"] if isinstance(s, dict) and s["type"] == "lm")
    assert isinstance(section["target_loss"], float)


def test_the_long_lm_study_tunes_adamw_over_lr_beta2_and_warmup() -> None:
    """lm_long.yaml: 2000 steps, validation every 100; AdamW swept over 4 lrs × β₂ {0.95, 0.99} × warm-up {100, 300},
    the others over 4 lrs (warm-up 100); seeds 1 and 2 at one setting of each, a setting of its sweep."""
    spec = load_study(ROOT / "configs" / "studies" / "text" / "lm_long.yaml")
    runs = expand(spec)
    base = spec.base
    assert base["trainer"]["max_epochs"] * base["data"]["init_args"]["windows_per_epoch"] // \
        base["data"]["init_args"]["batch_size"] == 2000
    assert base["data"]["init_args"]["windows_per_epoch"] // base["data"]["init_args"]["batch_size"] == 100
    adamw = [r for r in runs if r.axes["optimizer"] == "AdamW" and r.seed == 0]
    assert len(adamw) == 16
    settings = {(r.config["model"]["init_args"]["optimizer"]["init_args"]["lr"],
                 tuple(r.config["model"]["init_args"]["optimizer"]["init_args"]["betas"]),
                 r.config["model"]["init_args"]["scheduler"]["init_args"]["warmup_steps"]) for r in adamw}
    assert settings == {(lr, (0.9, b2), w) for lr in (6e-4, 1.2e-3, 2.4e-3, 4.8e-3) for b2 in (0.95, 0.99)
                        for w in (100, 300)}
    seeds: dict[str, list[int]] = {}
    for run in runs:
        seeds.setdefault(run.group, []).append(run.seed)
    for name in {r.axes["optimizer"] for r in runs}:
        groups = {g: s for g, s in seeds.items() if g.startswith(f"optimizer={name},")}
        assert sorted(map(sorted, groups.values())).count([0, 1, 2]) == 1, name  # one seeded setting, in the sweep
        assert len(groups) == (16 if name == "AdamW" else 4), name
        others = [r for r in runs if r.axes["optimizer"] == name and name != "AdamW"]
        assert all(r.config["model"]["init_args"]["scheduler"]["init_args"]["warmup_steps"] == 100 for r in others)
    assert len(runs) == 16 + 4 * 8 + 2 * 9
    assert {r.axes["optimizer"] for r in runs if r.axes["optimizer"] == "MuonSphere"} and all(
        r.config["model"]["init_args"]["optimizer"]["init_args"]["multiplier"] is False
        for r in runs if r.axes["optimizer"] == "MuonSphere")


def test_collect_writes_the_lm_section_from_result_files(tmp_path: Path) -> None:
    import yaml

    from lightning_spectral.experiments.report import collect
    from lightning_spectral.experiments.runner import run_dir

    def variant(name, cls):
        return {"name": name, "set": {"model.init_args.optimizer": {"class_path": cls, "init_args": {"lr": 0.1}}}}

    lr = "model.init_args.optimizer.init_args.lr"
    adamw, muon = variant("AdamW", "torch.optim.AdamW"), variant("Muon", "lightning_spectral.optim.Muon")
    spec = {"name": "lmfake", "base": str(ROOT / "configs" / "gpt_quickstart.yaml"), "seeds": [0], "grids": [
        {"optimizer": [adamw], "lr": {"key": lr, "values": [0.001, 0.003, 0.01]}},
        {"optimizer": [muon], "lr": {"key": lr, "values": [0.02, 0.05]}},
        {"axes": {"optimizer": [adamw], "lr": {"key": lr, "values": [0.003]}}, "seeds": [1, 2]},
        {"axes": {"optimizer": [muon], "lr": {"key": lr, "values": [0.02]}}, "seeds": [1, 2]},
    ], "report": {"sections": [{"type": "lm", "target_loss": 1.6}]}}
    path = tmp_path / "lmfake.yaml"
    path.write_text(yaml.safe_dump(spec))
    loaded = load_study(path)
    fakes = {(run.axes["optimizer"], run.values["lr"], run.seed): r for run, r in fake_results()}
    for run in expand(loaded):
        directory = run_dir(loaded, run, tmp_path / "out")
        directory.mkdir(parents=True)
        (directory / "result.json").write_text(json.dumps(fakes[run.axes["optimizer"], run.values["lr"], run.seed]))
    report = collect(loaded, tmp_path / "out")
    page = (report / "summary.md").read_text()
    assert "## Language model: optimizers at their best learning rate" in page
    assert "![validation loss](lmfake_val_loss.png)" in page and (report / "lmfake_val_loss.png").exists()
    assert json.loads((report / "lm_table.json").read_text())["rows"][0]["steps_to_target"] == pytest.approx(
        [70.0, 68.75, 62.5])
