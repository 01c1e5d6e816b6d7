"""Byte-level text data: the split by file, the recorded checksums, the windows, the bigram
baseline, and Tiny Shakespeare from a file the test writes (no network)."""

from __future__ import annotations

import hashlib
import math
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import torch

from lightning_spectral.data import DatasetUnavailableError
from lightning_spectral.data.text import (
    EpochWindowSampler,
    PythonSourceDataModule,
    TinyShakespeareDataModule,
    bigram_bpb,
    decode,
    encode,
)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Twenty small Python files in two packages, plus directories the corpus leaves out."""
    root = tmp_path / "lib"
    for i in range(20):
        path = root / ("pkg" if i % 2 else "") / f"mod_{i:02d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"def f_{i}(x):\n    return x * {i} + {i * i}\n\n" * (3 + i % 4))
    for skipped in ("site-packages/foreign.py", "test/test_x.py", "pkg/__pycache__/mod.py", "_sysconfigdata__x.py"):
        (root / skipped).parent.mkdir(parents=True, exist_ok=True)
        (root / skipped).write_text("SHOULD NOT BE READ\n" * 50)
    (root / "notes.txt").write_text("not python\n" * 50)
    return root


def _held_out(name: str, fraction: float) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest()[:16], 16) < fraction * 2**64


def test_split_by_file_and_recorded_checksums(corpus: Path):
    dm = PythonSourceDataModule(root=str(corpus), val_fraction=0.3, block_size=8, batch_size=4)
    dm.setup("fit")
    c = dm.corpus
    names = sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("mod_*.py")
                   if "site-packages" not in p.parts and "__pycache__" not in p.parts)
    assert sorted(c["train_files"] + c["val_files"]) == names  # every file once, nothing excluded read
    assert c["train_files"] == sorted(c["train_files"]) and c["val_files"] == sorted(c["val_files"])
    assert c["val_files"] and c["train_files"]
    assert all(_held_out(n, 0.3) for n in c["val_files"]) and not any(_held_out(n, 0.3) for n in c["train_files"])
    assert dm.train_text == b"".join((corpus / n).read_bytes() for n in c["train_files"])
    assert dm.val_text == b"".join((corpus / n).read_bytes() for n in c["val_files"])
    assert c["train_sha256"] == hashlib.sha256(dm.train_text).hexdigest()
    assert c["val_sha256"] == hashlib.sha256(dm.val_text).hexdigest()
    assert (c["train_bytes"], c["val_bytes"]) == (len(dm.train_text), len(dm.val_text))
    again = PythonSourceDataModule(root=str(corpus), val_fraction=0.3, block_size=8)
    again.setup("fit")
    assert again.corpus == c  # stable across instances
    assert dm.state_dict() == c


def test_max_bytes_takes_a_sorted_prefix_of_the_files(corpus: Path):
    full = PythonSourceDataModule(root=str(corpus), val_fraction=0.3, block_size=8)
    full.setup("fit")
    order = sorted(full.corpus["train_files"] + full.corpus["val_files"])
    sizes = [(corpus / n).stat().st_size for n in order]
    cap = sum(sizes[:7]) + 1  # room for 7 files and one byte: the 8th does not fit
    capped = PythonSourceDataModule(root=str(corpus), val_fraction=0.3, block_size=8, max_bytes=cap)
    capped.setup("fit")
    kept = sorted(capped.corpus["train_files"] + capped.corpus["val_files"])
    assert kept == order[:7]
    assert capped.corpus["train_bytes"] + capped.corpus["val_bytes"] == cap - 1
    # the split of a file does not depend on the others
    assert set(capped.corpus["val_files"]) == set(full.corpus["val_files"]) & set(kept)


def test_training_windows_are_shifted_pairs_seeded_by_epoch(corpus: Path):
    torch.manual_seed(7)
    dm = PythonSourceDataModule(root=str(corpus), val_fraction=0.3, block_size=16, batch_size=4,
                                windows_per_epoch=24)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 6
    batches = list(loader)
    text = dm.train_text
    for x, y in batches:
        assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):
            assert bytes(row_x.tolist()) + bytes([int(row_y[-1])]) in text
    sampler = loader.sampler
    assert isinstance(sampler, EpochWindowSampler) and sampler.seed == 7
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == epoch0 != epoch1  # a function of (seed, epoch) only
    assert max(epoch0 + epoch1) <= len(text) - 17


def test_validation_windows_are_fixed_and_do_not_overlap(corpus: Path):
    dm = PythonSourceDataModule(root=str(corpus), val_fraction=0.3, block_size=8, batch_size=5)
    dm.setup("fit")
    starts = dm.val_dataloader().dataset.starts
    assert torch.equal(starts, torch.arange(0, len(dm.val_text) - 8, 8))
    first = [x for x, _ in dm.val_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, [x for x, _ in dm.val_dataloader()]))
    capped = PythonSourceDataModule(root=str(corpus), val_fraction=0.3, block_size=8, max_val_windows=3)
    capped.setup("fit")
    few = capped.val_dataloader().dataset.starts
    assert len(few) == 3 and few[0] == 0 and few[-1] == starts[-1]  # spread over the whole text


def test_bigram_bpb_matches_a_direct_count():
    train = b"abracadabra, abracadabra!"
    val = b"cadabra bra"
    pairs = Counter(zip(train, train[1:]))
    firsts = Counter(train[:-1])
    direct = -sum(math.log2((pairs[(a, b)] + 1) / (firsts[a] + 256)) for a, b in zip(val, val[1:])) / (len(val) - 1)
    assert bigram_bpb(train, val) == pytest.approx(direct, rel=1e-12)
    # one pair learnt, (a, b): p = 2/257; the other 254 pairs start with unseen bytes: p = 1/256
    expected = (254 * 8 - math.log2(2 / 257)) / 255
    assert bigram_bpb(b"ab", bytes(range(256))) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="two bytes"):
        bigram_bpb(b"a", val)


def test_encode_decode_round_trip():
    text = "déjà vu → ok\n"
    assert decode(encode(text)) == text
    assert decode([0xE2, 0x86]) == "\ufffd"  # a cut character does not raise


def test_the_standard_library_corpus_loads():
    dm = PythonSourceDataModule(max_bytes=300_000, block_size=64)
    dm.setup("fit")
    assert dm.corpus["train_files"] and dm.corpus["val_files"]
    assert 0 < dm.corpus["train_bytes"] + dm.corpus["val_bytes"] <= 300_000
    assert not any(part in ("site-packages", "test") for n in dm.corpus["train_files"] for part in n.split("/"))
    assert b"def " in dm.train_text


def test_a_checkpoint_of_other_text_warns(corpus: Path):
    dm = PythonSourceDataModule(root=str(corpus), val_fraction=0.3, block_size=8)
    dm.setup("fit")
    dm.load_state_dict(dm.state_dict())  # same text: silent
    with pytest.warns(UserWarning, match="train_sha256"):
        dm.load_state_dict({**dm.state_dict(), "train_sha256": "0" * 64})


def test_bad_arguments_name_the_problem(corpus: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="block_size"):
        PythonSourceDataModule(block_size=0)
    with pytest.raises(ValueError, match="val_fraction"):
        PythonSourceDataModule(val_fraction=1.0)
    with pytest.raises(ValueError, match="windows_per_epoch"):
        PythonSourceDataModule(windows_per_epoch=8, batch_size=16)
    with pytest.raises(ValueError, match="prompts"):
        PythonSourceDataModule(prompts="def ")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="split is empty"):
        PythonSourceDataModule(root=str(empty)).setup("fit")
    with pytest.raises(ValueError, match="fewer than block_size"):
        PythonSourceDataModule(root=str(corpus), val_fraction=0.3, block_size=100_000).setup("fit")


def _shakespeare(data_dir: Path) -> bytes:
    text = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 40).encode()
    path = data_dir / "tiny_shakespeare" / "input.txt"
    path.parent.mkdir(parents=True)
    path.write_bytes(text)
    return text


def test_tiny_shakespeare_from_a_file_in_data_dir(tmp_path: Path):
    text = _shakespeare(tmp_path)
    dm = TinyShakespeareDataModule(data_dir=str(tmp_path), download=False, block_size=32, batch_size=4)
    dm.prepare_data()  # present: nothing to fetch
    dm.setup("fit")
    cut = int(len(text) * 0.9)
    assert dm.train_text == text[:cut] and dm.val_text == text[cut:]
    assert dm.corpus["train_files"] == [f"input.txt[:{cut}]"]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])


def test_tiny_shakespeare_offline_errors_name_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "tiny_shakespeare" / "input.txt"
    dm = TinyShakespeareDataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(DatasetUnavailableError, match="download=False") as err:
        dm.prepare_data()
    assert str(target) in str(err.value) and TinyShakespeareDataModule.url in str(err.value)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DatasetUnavailableError, match="could not be downloaded") as err:
        TinyShakespeareDataModule(data_dir=str(tmp_path), download=True).prepare_data()
    assert str(target) in str(err.value) and TinyShakespeareDataModule.url in str(err.value)
    assert not target.exists() and not target.with_suffix(".part").exists()
    with pytest.raises(DatasetUnavailableError, match="prepare_data has not fetched it"):
        dm.setup("fit")


def test_under_ddp_each_rank_takes_a_share_of_the_same_epoch_draw():
    """Lightning wraps a custom sampler in its DistributedSamplerWrapper (not a pass over every start)."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    sampler = EpochWindowSampler(num_starts=10_000, num_windows=64, seed=5)
    ranks = [DistributedSamplerWrapper(sampler, num_replicas=2, rank=r, shuffle=False) for r in range(2)]
    draws = []
    for epoch in (0, 1):
        for wrapper in ranks:
            wrapper.set_epoch(epoch)  # forwarded to the inner sampler
        shares = [list(w) for w in ranks]
        assert len(shares[0]) == len(shares[1]) == 32
        sampler.set_epoch(epoch)
        assert sorted(shares[0] + shares[1]) == sorted(sampler)
        draws.append(shares[0])
    assert draws[0] != draws[1]  # a new draw each epoch
