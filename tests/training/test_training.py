import json
import logging

import numpy as np
import pytest
import torch

from zreward_fast import ZRewardModel
from zreward_fast.cli import main
from zreward_fast.scale import ScoreScale
from zreward_fast.testing import tiny_model
from zreward_fast.training import synthetic
from zreward_fast.training.data import (
    ManifestError, PairRecord, RISDRecord, read_manifest, soft_targets, write_synthetic_dataset,
)
from zreward_fast.training.gdso import GDSOConfig, GDSOTrainer
from zreward_fast.training.labelling import label_risd_targets
from zreward_fast.training.metrics import evaluate_pairs, hpa
from zreward_fast.training.risd import RISDConfig, RISDTrainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_dataset(d, 8, seed=3, size=64)


def _rm(seed=0):
    return ZRewardModel(*tiny_model(seed=seed))


# ---------------------------------------------------------------- synthetic data
def test_synthetic_is_deterministic_and_on_the_half_point_scale():
    a, b = synthetic.make_sample(11), synthetic.make_sample(11)
    assert a.prompt == b.prompt and a.scores == b.scores
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    for s in synthetic.samples(40, seed=2):
        for v in s.scores.values():
            assert 0.0 <= v <= 4.0 and v * 2 == int(v * 2)


def test_synthetic_targets_are_realised():
    target = {"alignment": 2.0, "realism": 1.5, "aesthetics": 3.0, "plausibility": 3.0}
    s = synthetic.make_sample(5, target=target)
    assert s.scores == target


@pytest.mark.parametrize("dim", synthetic.DIMENSIONS)
def test_degraded_pair_drops_only_its_dimension(dim):
    clean, bad = synthetic.degraded_pair(7, dim, drop=2.0)
    assert clean.prompt == bad.prompt
    for d in synthetic.DIMENSIONS:
        assert bad.scores[d] == clean.scores[d] - (2.0 if d == dim else 0.0)
    assert not np.array_equal(np.asarray(clean.image), np.asarray(bad.image))


# ---------------------------------------------------------------- manifests
def test_manifests_roundtrip(data):
    scored = read_manifest(data["scored"], "scored")
    pairs = read_manifest(data["pairs"], "pairs")
    risd = read_manifest(data["risd"], "risd")
    assert len(scored) == len(pairs) == len(risd) == 8
    assert set(scored[0].scores) == set(synthetic.DIMENSIONS)
    assert all(isinstance(p, PairRecord) and p.scores[0] > p.scores[1] for p in pairs)
    assert all(abs(sum(v) - 1) < 1e-6 for r in risd for v in r.targets.values())


@pytest.mark.parametrize(
    "row, kind, match",
    [
        ({"image": "x.png"}, "scored", "missing field 'prompt'"),
        ({"prompt": "p", "image": "missing.png", "score": 1.0, "dimension": "realism"}, "scored", "image file not found"),
        ({"prompt": "p", "image": "ok.png", "dimension": "beauty", "score": 1.0}, "scored", "unknown dimension"),
        ({"prompt": "p", "image": "ok.png", "dimension": "realism", "score": 7.0}, "scored", "outside the scale"),
        ({"prompt": "p", "image": "ok.png", "dimension": "realism", "score": None}, "scored", "finite number"),
        ({"prompt": "p", "dimension": "realism", "images": ["ok.png"], "scores": [1.0]}, "pairs", "exactly two"),
        ({"prompt": "p", "image": "ok.png", "targets": {"realism": [0.5] * 9}}, "risd", "sums to"),
        ({"prompt": "p", "image": "ok.png", "targets": {"realism": [1.0]}}, "risd", "list of 9"),
        ({"prompt": "p", "image": "ok.png", "targets": {"realism": [-1.0, 2.0] + [0.0] * 7}}, "risd", ">= 0"),
    ],
)
def test_manifest_errors_name_the_line(tmp_path, row, kind, match):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    m = tmp_path / "m.jsonl"
    m.write_text("\n" + json.dumps(row) + "\n")
    with pytest.raises(ManifestError, match=match) as e:
        read_manifest(m, kind)
    assert "m.jsonl:2" in str(e.value)


def test_manifest_bad_json_and_empty(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text("{not json\n")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(m, "scored")
    m.write_text("")
    with pytest.raises(ManifestError, match="no records"):
        read_manifest(m, "scored")
    with pytest.raises(ValueError, match="kind"):
        read_manifest(m, "videos")


def test_soft_targets():
    t = soft_targets(2.5, ScoreScale())
    assert abs(sum(t) - 1) < 1e-9 and int(np.argmax(t)) == 5


# ---------------------------------------------------------------- metrics
def test_hpa_and_correlations():
    prompts = ["a", "a", "a", "b", "b"]
    labels = [1.0, 2.0, 3.0, 2.0, 2.4]
    preds = [0.1, 0.3, 0.2, 0.5, 0.9]
    # pairs with different labels: a(1,2) ok, a(1,3) ok, a(2,3) wrong, b ok -> 3/4
    assert hpa(prompts, labels, preds) == pytest.approx(0.75)
    # margin 0.5 drops the b pair (0.4 apart): 2/3
    assert hpa(prompts, labels, preds, margin=0.5) == pytest.approx(2 / 3)
    assert hpa(["a", "a"], [1.0, 2.0], [0.5, 0.5]) == 0.5  # a predicted tie counts half
    m = evaluate_pairs(prompts, labels, preds)
    assert m["plcc"] == pytest.approx(np.corrcoef(labels, preds)[0, 1])
    # Spearman: Pearson of the ranks, ties sharing their mean rank (the two 2.0 labels: 2.5 each)
    label_ranks, pred_ranks = [1.0, 2.5, 5.0, 2.5, 4.0], [1.0, 3.0, 2.0, 4.0, 5.0]
    assert m["srcc"] == pytest.approx(np.corrcoef(label_ranks, pred_ranks)[0, 1])


# ---------------------------------------------------------------- RISD
def _risd(records, seed=0, **kw):
    cfg = RISDConfig(batch_size=4, learning_rate=3e-3, max_steps=8, seed=seed, **kw)
    return RISDTrainer(_rm(), cfg, train_records=records)


def test_risd_loss_goes_down_and_only_score_rows_train(data, tmp_path):
    records = read_manifest(data["risd"], "risd")[:4]  # one fixed batch
    tr = _risd(records)
    head = tr._unwrapped().reward_model.lm_head
    assert not head.weight.requires_grad
    opt_params = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert id(head.weight) not in opt_params and id(tr._unwrapped().score_rows) in opt_params
    before = head.weight.detach().clone()
    state = tr.train()
    losses = [h["loss"] for h in state.history]
    assert len(losses) == 8 and losses[-1] < 0.7 * losses[0]
    assert torch.equal(head.weight, before)  # the head itself is untouched until write-back
    out = tmp_path / "student"
    tr.save_pretrained(out)
    again = ZRewardModel.from_pretrained(out)
    rows = tr._unwrapped().score_rows.detach()
    torch.testing.assert_close(again.lm_head.weight[again.score_token_ids], rows)


def test_risd_resume_gives_the_same_next_loss(data, tmp_path):
    records = read_manifest(data["risd"], "risd")
    sched = dict(lr_scheduler_type="cosine", warmup_ratio=0.25)  # the scheduler's state travels too
    full = _risd(records, **sched)
    full.train(4)
    want = full.state.history[3]["loss"]
    first = _risd(records, **sched)
    first.train(3)
    first.save_checkpoint(tmp_path / "ckpt")
    resumed = _risd(records, **sched)
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert resumed.state.step == 3
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(first.optimizer.param_groups[0]["lr"])
    resumed.train(4)
    assert resumed.state.history[-1]["loss"] == pytest.approx(want, abs=1e-6)


def test_learning_rate_follows_warmup_then_cosine_decay(data):
    records = read_manifest(data["risd"], "risd")[:4]
    tr = _risd(records, lr_scheduler_type="cosine", warmup_ratio=0.25)
    lrs = []
    for _ in range(8):
        lrs.append(tr.optimizer.param_groups[0]["lr"])
        tr.train(tr.state.step + 1)
    peak = 3e-3
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(peak / 2) and lrs[2] == pytest.approx(peak)  # 2 warmup steps
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))  # then decays every step
    assert tr.optimizer.param_groups[0]["lr"] < 0.05 * peak
    assert _risd(records).optimizer.param_groups[0]["lr"] == peak  # constant by default
    with pytest.raises(ValueError, match="warmup_ratio"):
        _risd(records, warmup_ratio=1.0)


def test_risd_nan_batch_is_reported_not_trained_on(data, caplog):
    records = read_manifest(data["risd"], "risd")[:4]
    bad = [RISDRecord(r.image, r.prompt, {d: list(v) for d, v in r.targets.items()}) for r in records]
    bad[1].targets["realism"][0] = float("nan")
    tr = _risd(bad)
    rows = tr._unwrapped().score_rows.detach().clone()
    with caplog.at_level(logging.WARNING):
        assert tr.training_step(bad) is None
    assert "not trained on" in caplog.text and "NaN" in caplog.text
    assert tr.state.skipped_batches == 1
    assert torch.equal(tr._unwrapped().score_rows.detach(), rows)


def test_risd_evaluate(data):
    tr = _risd(read_manifest(data["risd"], "risd"))
    records = read_manifest(data["scored"], "scored")
    m = tr.evaluate(records)
    assert set(m) == set(synthetic.DIMENSIONS)
    # the figures are those of the student's own scores of the records (score rows written back)
    student = tr._unwrapped()
    student.write_back()
    rm = student.reward_model.eval()
    scores = rm.score([r.image for r in records], [r.prompt for r in records])
    for d, v in m.items():
        want = evaluate_pairs([r.prompt for r in records], [r.scores[d] for r in records], [s[d].mean for s in scores])
        assert v == pytest.approx(want, abs=1e-6, nan_ok=True), d


# ---------------------------------------------------------------- GDSO
def _gdso(records, **kw):
    cfg = GDSOConfig(num_rollouts=3, pairs_per_step=2, max_new_tokens=4, learning_rate=3e-3, max_steps=6, **kw)
    return GDSOTrainer(_rm(), cfg, train_records=records)


def test_gdso_steps_run_and_supervised_loss_goes_down(data):
    pairs = read_manifest(data["pairs"], "pairs")[:2]  # one fixed batch
    tr = _gdso(pairs)
    state = tr.train()
    sup = [h["loss_pt"] + h["loss_pw"] for h in state.history]
    assert len(sup) == 6 and sup[-1] < sup[0]
    assert all(h["reasoning_tokens"] > 0 for h in state.history)


def test_gdso_resume_gives_the_same_next_loss(data, tmp_path):
    pairs = read_manifest(data["pairs"], "pairs")
    full = _gdso(pairs)
    full.train(3)
    first = _gdso(pairs)
    first.train(2)
    first.save_checkpoint(tmp_path / "ckpt")
    resumed = _gdso(pairs)
    resumed.load_checkpoint(tmp_path / "ckpt")
    resumed.train(3)
    assert resumed.state.history[-1]["loss"] == pytest.approx(full.state.history[2]["loss"], abs=1e-6)


def test_gdso_nan_batch_is_reported(data, caplog):
    pairs = read_manifest(data["pairs"], "pairs")[:2]
    bad = [PairRecord(pairs[0].prompt, pairs[0].dimension, pairs[0].images, (float("nan"), 1.0)), pairs[1]]
    tr = _gdso(bad)
    with caplog.at_level(logging.WARNING):
        assert tr.training_step(bad) is None
    assert "not trained on" in caplog.text and tr.state.skipped_batches == 1


def test_gdso_config_rejects_g1():
    with pytest.raises(ValueError, match="G"):
        GDSOConfig(num_rollouts=1)


def test_labelling_writes_risd_targets(data, tmp_path):
    rm = _rm()
    records = read_manifest(data["scored"], "scored")[:3]
    out = label_risd_targets(rm, records, tmp_path / "risd.jsonl", dimensions=["realism", "alignment"],
                             num_samples=2, batch_size=2)
    labelled = read_manifest(out, "risd")
    assert len(labelled) == 3 and set(labelled[0].targets) == {"realism", "alignment"}


def test_greedy_labels_are_the_teachers_scores_whatever_the_batch(data, tmp_path):
    """With greedy reasoning a label is the teacher's distribution after its reasoning: the same
    values from the teacher behind the benchmark's scorer, and the same in batches of 2 and of 1
    (left padding must not change a prompt's reasoning or its score)."""
    from zreward_fast.evaluation import TeacherScorer
    from zreward_fast.training.teacher import default_engine

    rm = _rm()
    records = read_manifest(data["scored"], "scored")[:3]
    engine = default_engine(rm, 8, do_sample=False)
    dims = ["realism", "alignment"]
    two = read_manifest(label_risd_targets(rm, records, tmp_path / "b2.jsonl", dims, engine, batch_size=2), "risd")
    one = read_manifest(label_risd_targets(rm, records, tmp_path / "b1.jsonl", dims, engine, batch_size=1), "risd")
    scored = TeacherScorer(rm, engine).score([r.image for r in records], [r.prompt for r in records], dims)
    for a, b, want in zip(two, one, scored):
        for d in dims:
            np.testing.assert_allclose(a.targets[d], b.targets[d], atol=1e-5)
            np.testing.assert_allclose(a.targets[d], want[d].probs, atol=1e-5)
            assert sum(a.targets[d]) == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------- CLI and configs
def test_cli_train_risd(data, tmp_path, capsys):
    cfg = tmp_path / "risd.yaml"
    cfg.write_text(f"train_manifest: {data['risd']}\neval_manifest: {data['scored']}\n"
                   f"output_dir: {tmp_path / 'out'}\nbatch_size: 4\nlearning_rate: 0.003\nmax_steps: 3\n")
    assert main(["train", "risd", "--config", str(cfg)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and "eval" in summary
    assert ZRewardModel.from_pretrained(summary["saved"]) is not None
    bad = tmp_path / "bad.yaml"
    bad.write_text("train_manifest: x\nlearning_rat: 0.1\n")
    assert main(["train", "risd", "--config", str(bad)]) == 2
    assert "unknown RISDConfig fields ['learning_rat']" in capsys.readouterr().err
