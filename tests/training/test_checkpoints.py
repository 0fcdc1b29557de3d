"""Saving never leaves a mix (issue 12, point 2): a save interrupted at any file leaves the old
checkpoint / model / bundle, the new one, or a directory its loader refuses with a clear error."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from zreward_fast import ZRewardModel, fileio
from zreward_fast.testing import tiny_model
from zreward_fast.training.data import read_manifest, write_synthetic_dataset
from zreward_fast.training.risd import RISDConfig, RISDTrainer


class Boom(OSError):
    pass


def _files(d: Path) -> dict[str, str]:
    """Top-level files of a directory and their digests (subdirectories aside)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def _fail_at(monkeypatch, name: str, k: int) -> list[int]:
    """Make the k-th call of fileio's os.<name> raise (counting from 0); returns the call counter."""
    calls = [0]
    real = getattr(os, name)

    def flaky(*a, **kw):
        calls[0] += 1
        if calls[0] - 1 == k:
            raise Boom(f"injected failure in os.{name} call {k}")
        return real(*a, **kw)

    monkeypatch.setattr(fileio.os, name, flaky)
    return calls


# ---------------------------------------------------------------- fileio
def test_staged_directory_leaves_the_destination_alone_on_error(tmp_path):
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with fileio.staged_directory(dest) as tmp:
            (tmp / "a.txt").write_text("new")
            raise RuntimeError("writer failed")
    assert (dest / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no staging left behind
    with fileio.staged_directory(dest) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]  # a whole-directory replace
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_atomic_write_text_keeps_the_old_text_when_the_replace_fails(tmp_path, monkeypatch):
    p = tmp_path / "state.json"
    fileio.atomic_write_text(p, "old")
    _fail_at(monkeypatch, "replace", 0)
    with pytest.raises(Boom):
        fileio.atomic_write_text(p, "new")
    assert p.read_text() == "old" and [q.name for q in tmp_path.iterdir()] == ["state.json"]


# ---------------------------------------------------------------- models
@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    ZRewardModel(*tiny_model(0)).save_pretrained(root / "a0")
    ZRewardModel(*tiny_model(1)).save_pretrained(root / "b0")
    # what the test saves: the models as loaded (a loaded config gains fields)
    ZRewardModel.from_pretrained(root / "a0").save_pretrained(root / "a")
    ZRewardModel.from_pretrained(root / "b0").save_pretrained(root / "b")
    return root, _files(root / "a"), _files(root / "b")


def _assert_old_new_or_refused(d: Path, old: dict, new: dict) -> str:
    got = _files(d)
    if "config.json" not in got:
        with pytest.raises(FileNotFoundError, match="config.json"):
            ZRewardModel.from_pretrained(d)
        return "refused"
    assert got in (old, new), "a mix of two saves"
    return "old" if got == old else "new"


@pytest.mark.parametrize("op", ["replace", "rename"])
def test_model_save_interrupted_at_each_file(two_models, tmp_path, monkeypatch, op):
    """Saving model B over model A in a directory that also holds a checkpoint, failing at every
    file move in turn: A, B or a refused directory, and the checkpoint stays."""
    root, old, new = two_models
    outcomes = set()
    for k in range(len(new) + 1):
        d = tmp_path / f"out{k}"
        ZRewardModel.from_pretrained(root / "a").save_pretrained(d)
        (d / "checkpoint-3").mkdir()
        (d / "checkpoint-3" / "trainer_state.json").write_text("{}")
        b = ZRewardModel.from_pretrained(root / "b")
        with monkeypatch.context() as m:
            calls = _fail_at(m, op, k)
            try:
                b.save_pretrained(d)
            except Boom:
                pass
        outcomes.add(_assert_old_new_or_refused(d, old, new))
        assert (d / "checkpoint-3" / "trainer_state.json").is_file()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging left behind"
        if calls[0] <= k:  # the save made fewer moves than k: all later k succeed too
            break
    assert "new" in outcomes and (op == "rename" or {"refused"} <= outcomes), outcomes
    again = ZRewardModel.from_pretrained(d)  # the last one completed
    assert torch.equal(again.lm_head.weight, ZRewardModel.from_pretrained(root / "b").lm_head.weight)


def test_model_save_that_fails_while_writing_changes_nothing(two_models, tmp_path):
    root, old, _ = two_models
    d = tmp_path / "m"
    ZRewardModel.from_pretrained(root / "a").save_pretrained(d)

    def broken(path: Path) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ZRewardModel.from_pretrained(root / "b").save_pretrained(d, also_write=broken)
    assert _files(d) == old


# ---------------------------------------------------------------- trainer checkpoints
@pytest.fixture(scope="module")
def records(tmp_path_factory):
    paths = write_synthetic_dataset(tmp_path_factory.mktemp("data"), 8, seed=3, size=64)
    return read_manifest(paths["risd"], "risd")


def _trainer(records) -> RISDTrainer:
    return RISDTrainer(ZRewardModel(*tiny_model(0)), RISDConfig(batch_size=4, learning_rate=3e-3, max_steps=8, seed=0),
                       train_records=records)


def _score_rows(tr: RISDTrainer) -> torch.Tensor:
    return tr._unwrapped().score_rows.detach().clone()


def _resume(records, d: Path) -> RISDTrainer | None:
    tr = _trainer(records)
    try:
        tr.load_checkpoint(d)
    except (FileNotFoundError, ValueError) as e:
        assert "checkpoint" in str(e) or "trainer state" in str(e), e
        return None
    return tr


@pytest.mark.parametrize("failure", ["save_state", "state_file", "rename-0", "rename-1"])
def test_checkpoint_save_interrupted_resumes_old_or_refuses(records, tmp_path, monkeypatch, failure):
    d = tmp_path / "checkpoint"
    tr = _trainer(records)
    tr.train(3)
    tr.save_checkpoint(d)
    old_rows = _score_rows(tr)
    tr.train(5)
    with monkeypatch.context() as m:
        if failure == "save_state":  # accelerate wrote some files, then died
            real = tr.accelerator.save_state

            def half(path, *a, **kw):
                real(path, *a, **kw)
                next(p for p in Path(path).iterdir() if p.is_file()).write_bytes(b"torn")
                raise Boom("killed during save_state")

            m.setattr(tr.accelerator, "save_state", half)
        elif failure == "state_file":
            m.setattr("zreward_fast.training.common.atomic_write_text",
                      lambda *a: (_ for _ in ()).throw(Boom("killed writing the trainer state")))
        else:
            _fail_at(m, "rename", int(failure[-1]))
        with pytest.raises(Boom):
            tr.save_checkpoint(d)
    # the old checkpoint, whole (a failed rename of the new one in renames the old one back)
    resumed = _resume(records, d)
    assert resumed is not None and resumed.state.step == 3
    assert torch.equal(_score_rows(resumed), old_rows)
    # the next save succeeds and replaces whatever was left
    tr.save_checkpoint(d)
    resumed = _resume(records, d)
    assert resumed is not None and resumed.state.step == 5 and torch.equal(_score_rows(resumed), _score_rows(tr))


def test_truncated_trainer_state_is_a_clear_error(records, tmp_path):
    d = tmp_path / "checkpoint"
    tr = _trainer(records)
    tr.train(2)
    tr.save_checkpoint(d)
    state = d / "trainer_state.json"
    state.write_text(state.read_text()[:10])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        _trainer(records).load_checkpoint(d)
    state.unlink()
    with pytest.raises(FileNotFoundError, match="interrupted"):
        _trainer(records).load_checkpoint(d)
