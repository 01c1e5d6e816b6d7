"""The package's LightningModules under Lightning's ``ModelParallelStrategy`` (FSDP2 through their
``configure_model``) on 2 CPU gloo processes.

Each case fits one epoch, saves Lightning's distributed checkpoint (a directory), resumes from it
for a second epoch, and compares the final full weights with a one-process fit of the same two
epochs. Both ranks read the same batches (``use_distributed_sampler=False``), so the gradient
FSDP2 averages over the ranks is the one-process gradient and the runs must agree to float
rounding. Cases: :class:`SpectralModule` (MLP on digits) with ``Muon`` and with ``SpectralBall``
(whose bias takes the AdamW fallback: its state must be in the checkpoint), and
:class:`LanguageModule` (a 2-block GPT) with ``Muon``.
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
    """Written by tests/test_module_sharded.py: one fit of a case, 2 processes under
    ModelParallelStrategy or 1 process without it."""
    import json
    import sys
    from functools import partial

    import lightning.pytorch as L
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_spectral import optim as O
    from lightning_spectral.lm_module import LanguageModule
    from lightning_spectral.models.gpt import GPT
    from lightning_spectral.models.mlp import MLP
    from lightning_spectral.module import CosineSchedule, SpectralModule
    from lightning_spectral.optim.param_groups import routing_table

    BATCHES = 3  # limit_train_batches, of 4 in the loader


    def schedule(optimizer):
        return CosineSchedule(optimizer, total_steps=2 * BATCHES, warmup_steps=1)


    def build(case):
        torch.manual_seed(0)
        if case == "lm":
            net = GPT(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32)
            return LanguageModule(net, optimizer=partial(O.Muon, lr=0.02), scheduler=schedule, max_new_tokens=4)
        optimizer = partial(O.SpectralBall, lr=0.05) if case == "ball" else partial(O.Muon, lr=0.02)
        cls, extra = (PoisonedOnRank1, dict(nonfinite="skip")) if case == "skip" else (SpectralModule, {})
        return cls(MLP(in_features=64, num_classes=10, hidden_sizes=[32, 32]), optimizer=optimizer,
                   scheduler=schedule, **extra)


    class PoisonedOnRank1(SpectralModule):
        """A NaN in one gradient entry of rank 1's shard only, at the second batch."""

        def _finite_step(self, loss, optimizer, batch_idx):
            if batch_idx == 1 and self.global_rank == 1:
                next(p for p in self.net.parameters() if p.ndim == 2).grad.to_local().view(-1)[0] = float("nan")
            return super()._finite_step(loss, optimizer, batch_idx)


    def batches(case):
        g = torch.Generator().manual_seed(1)
        if case == "lm":
            tokens = torch.randint(0, 40, (4, 8, 17), generator=g)
            return [(t[:, :-1], t[:, 1:]) for t in tokens]
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x, y = torch.tensor(x[:128] / 16.0, dtype=torch.float32), torch.tensor(y[:128])
        return [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]


    def trainer(epochs, sharded):
        extra = dict(devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)) if sharded else dict(devices=1)
        return L.Trainer(accelerator="cpu", max_epochs=epochs, limit_train_batches=BATCHES, num_sanity_val_steps=0,
                         use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, **extra)


    def run(case, sharded, out, loader):
        result = {}
        initial = {n: p.detach().clone() for n, p in build(case).named_parameters()}
        if case == "skip":
            fit = trainer(1, True)
            model = build(case)
            fit.fit(model, loader)
            json.dump({"skipped": model.skipped_steps, "steps": fit.global_step},
                      open(f"{out}.rank{fit.global_rank}.json", "w"))
            return
        if sharded:
            first = trainer(1, True)
            model = build(case)
            first.fit(model, loader)
            result["types"] = sorted({type(p).__name__ for p in model.parameters()})
            # Sharded for real: rank 0 holds only part of the network's entries.
            result["local_fraction"] = (sum(p.to_local().numel() for p in model.parameters())
                                        / sum(p.numel() for p in model.parameters()))
            result["routing"] = routing_table(model.optimizers().optimizer, model.net)
            ckpt = out + ".ckpt"
            first.save_checkpoint(ckpt)  # Lightning's distributed checkpoint: a directory
            result["checkpoint_is_dir"] = __import__("os").path.isdir(ckpt)
            model, second = build(case), trainer(2, True)
            second.fit(model, loader, ckpt_path=ckpt)
        else:
            model, second = build(case), trainer(2, False)
            second.fit(model, loader)
        full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in model.named_parameters()}
        if second.is_global_zero:
            result["steps"] = second.global_step
            torch.save({"final": full, "initial": initial}, out + ".pt")
            json.dump(result, open(out + ".json", "w"))


    if __name__ == "__main__":
        torch.set_num_threads(1)
        cases, sharded, out = sys.argv[1].split(","), sys.argv[2] == "sharded", sys.argv[3]
        for case in cases:  # one launch for every case: the processes' start dominates these fits
            loader = torch.utils.data.DataLoader(batches(case), batch_size=None)  # the same batches on every rank
            run(case, sharded, f"{out}/{case}_{sys.argv[2]}", loader)
    '''
)


CASES = ["mlp", "ball", "lm"]
# All fits run in the first test's setup (two process launches instead of seven; 128-195 s measured
# on a shared 2-core machine at load 8-17, near the default 300 s): the module gets 900 s.
pytestmark = pytest.mark.timeout(900)


def _launch(out, cases: list[str], mode: str) -> None:
    script = out / "fit.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(script), ",".join(cases), mode, str(out)], cwd=out, env=env,
                          capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    """Every case fitted once: the sharded fits (and the poisoned one) in one 2-process launch, the
    one-process references in another."""
    out = tmp_path_factory.mktemp("sharded_fits")
    _launch(out, [*CASES, "skip"], "sharded")
    _launch(out, CASES, "plain")
    return out


def _result(out, case: str, mode: str) -> tuple[dict, dict]:
    stem = out / f"{case}_{mode}"
    return json.loads(stem.with_suffix(".json").read_text()), torch.load(stem.with_suffix(".pt"), weights_only=True)


@pytest.mark.parametrize("case", CASES)
def test_model_parallel_fit_resume_equals_one_process(fits, case):
    """configure_model shards the network (every parameter a DTensor, names unchanged in the
    routing table); a distributed checkpoint after one epoch resumes; the final weights equal a
    one-process fit of the same six steps."""
    sharded, saved = _result(fits, case, "sharded")
    _, plain = _result(fits, case, "plain")
    weights, reference, start = saved["final"], plain["final"], saved["initial"]
    assert sharded["types"] == ["DTensor"]
    assert sharded["local_fraction"] < 0.75, sharded["local_fraction"]  # about 1/2 on 2 ranks
    assert sharded["checkpoint_is_dir"]
    assert sharded["steps"] == 6
    assert weights.keys() == reference.keys()
    for name in weights:  # the original names, not FSDP-wrapped ones
        assert name.removeprefix("net.") in sharded["routing"], (name, sharded["routing"])
    moved = max((weights[n] - start[n]).abs().max().item() for n in weights)
    err = max((weights[n] - reference[n]).abs().max().item() for n in weights)
    assert moved > 1e-3
    assert err <= TOL, (case, err)


def test_nonfinite_gradient_on_one_rank_skipped_on_every_rank(fits):
    """A NaN in one entry of rank 1's gradient shard: the module's finite check is all-reduced,
    so both ranks skip that step (``nonfinite="skip"``) and keep stepping together."""
    ranks = [json.loads((fits / f"skip_sharded.rank{r}.json").read_text()) for r in range(2)]
    assert ranks == [{"skipped": 1, "steps": 2}] * 2
