"""Parity metrics of a quantized bundle against its reference (pure numpy)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from zreward_fast.runtime.bundle import QUANT_MODES
from zreward_fast.export.parity import DEFAULT_THRESHOLDS, check_thresholds, parity_report

LEVELS = [0.0, 1.0, 2.0]


def test_parity_known_answers():
    # N=2 items, D=2 dimensions, K=3 levels.
    ref = np.array([[[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]],
                    [[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]]])
    test = np.array([[[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]],
                     [[0.0, 1.0, 0.0], [0.5, 0.3, 0.2]]])
    r = parity_report(ref, test, LEVELS, ["a", "b"], pairs=[(0, 1)])
    a, b = r["dimensions"]["a"], r["dimensions"]["b"]
    # a: mu_ref = [0, 1], mu_test = [0.5, 1] -> |dmu| = [0.5, 0]
    assert a["mean_abs_dmu"] == pytest.approx(0.25) and a["max_abs_dmu"] == pytest.approx(0.5)
    # KL(ref || test): item 0 = 1*log(1/0.5) = log 2 (zeros of ref contribute 0), item 1 = 0
    assert a["mean_kl"] == pytest.approx(math.log(2) / 2) and a["max_kl"] == pytest.approx(math.log(2))
    # argmax item 0: ref 0, test 0 (tie 0.5/0.5 -> first) ; item 1 agrees
    assert a["argmax_agreement"] == pytest.approx(1.0)
    # pair (0,1): ref 0 < 1, test 0.5 < 1 -> agree
    assert a["pair_agreement"] == 1.0 and a["pairs_compared"] == 1 and a["pairs_tied"] == 0
    # b: mu_ref = [1.5, 1.3], mu_test = [1.5, 0.7] -> |dmu| = [0, 0.6]; argmax item 1 flips (2 vs 0)
    assert b["mean_abs_dmu"] == pytest.approx(0.3) and b["max_abs_dmu"] == pytest.approx(0.6)
    assert b["mean_kl"] == pytest.approx((0.2 * math.log(0.2 / 0.5) + 0.5 * math.log(0.5 / 0.2)) / 2)
    assert b["argmax_agreement"] == pytest.approx(0.5)
    assert b["pair_agreement"] == 1.0  # 1.5 > 1.3 and 1.5 > 0.7
    ov = r["overall"]
    assert ov["mean_abs_dmu"] == pytest.approx(0.3) and ov["max_abs_dmu"] == pytest.approx(0.6)
    assert ov["argmax_agreement"] == pytest.approx(0.5) and ov["mean_kl"] == pytest.approx(a["mean_kl"])
    assert r["items"] == 2 and r["levels"] == LEVELS and r["tie_tol"] == 0.0
    # Plain JSON types all the way down.
    assert json.loads(json.dumps(r)) == r
    assert all(type(v) in (float, int, type(None)) for blk in r["dimensions"].values() for v in blk.values())


def test_parity_identical_is_perfect_and_zero_probs_are_finite():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(9), size=(5, 4))
    p[0, 0] = np.eye(9)[3]  # a one-hot row: zeros everywhere else
    r = parity_report(p, p.copy(), np.linspace(0, 4, 9), ["alignment", "realism", "aesthetics", "plausibility"],
                      pairs=[(0, 1), (2, 3), (1, 4)])
    ov = r["overall"]
    assert ov["mean_abs_dmu"] == 0.0 and ov["max_kl"] == pytest.approx(0.0, abs=1e-12)
    assert ov["argmax_agreement"] == 1.0 and ov["pair_agreement"] == 1.0
    # test mass 0 where ref has mass: KL is large but finite (eps-guarded)
    ref = np.array([[[0.5, 0.5, 0.0]]])
    test = np.array([[[1.0, 0.0, 0.0]]])
    kl = parity_report(ref, test, LEVELS, ["d"])["dimensions"]["d"]["mean_kl"]
    assert math.isfinite(kl) and kl > 10


def test_parity_pairs_with_ties_and_disagreement():
    # mu_ref = [1, 1, 2, 0]; mu_test = [1, 2, 1, 0]
    lv = [0.0, 1.0, 2.0]
    oh = np.eye(3)
    ref = np.stack([oh[1], oh[1], oh[2], oh[0]])[:, None, :]
    test = np.stack([oh[1], oh[2], oh[1], oh[0]])[:, None, :]
    pairs = [(0, 1), (0, 2), (1, 2), (2, 3), (3, 0)]
    d = parity_report(ref, test, lv, ["x"], pairs)["dimensions"]["x"]
    # (0,1) tied in the reference -> excluded; (0,2): ref <, test = -> disagree; (1,2): ref <, test > -> disagree;
    # (2,3): ref >, test > -> agree; (3,0): ref <, test < -> agree
    assert d["pairs_tied"] == 1 and d["pairs_compared"] == 4
    assert d["pair_agreement"] == pytest.approx(0.5)
    only_ties = parity_report(ref, test, lv, ["x"], [(0, 1)])["dimensions"]["x"]
    assert only_ties["pair_agreement"] is None and only_ties["pairs_compared"] == 0
    assert parity_report(ref, test, lv, ["x"])["overall"]["pair_agreement"] is None
    # tie_tol=1: reference differences of at most 1 count as ties: (0,1), (0,2), (1,2), (3,0);
    # only (2,3) with |2 - 0| = 2 is compared (and agrees)
    wide = parity_report(ref, test, lv, ["x"], pairs, tie_tol=1.0)["dimensions"]["x"]
    assert wide["pairs_compared"] == 1 and wide["pairs_tied"] == 4 and wide["pair_agreement"] == 1.0


def test_parity_validates_inputs():
    p = np.full((2, 1, 3), 1 / 3)
    with pytest.raises(ValueError, match="differ in shape"):
        parity_report(p, np.full((3, 1, 3), 1 / 3), LEVELS, ["d"])
    with pytest.raises(ValueError, match="log-probabilities"):
        parity_report(np.log(p), p, LEVELS, ["d"])
    with pytest.raises(ValueError, match="levels"):
        parity_report(p, p, [0.0, 1.0], ["d"])
    with pytest.raises(ValueError, match="dimension names"):
        parity_report(p, p, LEVELS, ["a", "b"])
    with pytest.raises(ValueError, match="pair indices"):
        parity_report(p, p, LEVELS, ["d"], [(0, 2)])
    with pytest.raises(ValueError, match=r"\[N, D, K\]"):
        parity_report(p[0], p[0], LEVELS, ["d"])


def test_check_thresholds_messages():
    ref = np.array([[[0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]])
    test = np.array([[[0.0, 0.929, 0.071]], [[0.0, 0.0, 1.0]]])  # dmu 0.071 on item 0
    r = parity_report(ref, test, LEVELS, ["realism"], [(0, 1)])
    assert check_thresholds(r, {"max_abs_dmu": 0.05}) == ["realism: max |Δμ| 0.071 > 0.05"]
    assert check_thresholds(r, {"max_abs_dmu": 0.1, "pair_agreement": 0.98}) == []
    assert check_thresholds(r, "int8-dynamic") == []  # mean |dmu| 0.0355 <= 0.05
    fails = check_thresholds(r, "none")
    assert fails == ["realism: mean |Δμ| 0.0355 > 0.001", "realism: max |Δμ| 0.071 > 0.001"]
    worse = parity_report(ref, test[::-1], LEVELS, ["realism"], [(0, 1)])
    assert "all dimensions: pooled pairwise agreement 0 < 0.98" in check_thresholds(worse, DEFAULT_THRESHOLDS["int8-static"])
    assert "realism: pairwise agreement 0 < 0.98" in check_thresholds(worse, {"pair_agreement": 0.98})
    no_pairs = parity_report(ref, test, LEVELS, ["realism"])
    assert check_thresholds(no_pairs, "fp8") == ["all dimensions: pooled pairwise agreement not measured (no untied pairs)"]
    assert check_thresholds(no_pairs, {"pair_agreement": 0.98}) == ["realism: pairwise agreement not measured (no untied pairs)"]
    with pytest.raises(ValueError, match="unknown threshold"):
        check_thresholds(r, {"mean_dmu": 0.1})
    with pytest.raises(ValueError, match="unknown mode"):
        check_thresholds(r, "int4")


def test_default_thresholds_cover_every_mode():
    assert set(DEFAULT_THRESHOLDS) == set(QUANT_MODES) == {"none", "int8-dynamic", "int8-static", "fp8",
                                                           "int8-weight", "int4-weight"}
    assert DEFAULT_THRESHOLDS["none"]["max_abs_dmu"] == 1e-3
    for mode in ("int8-dynamic", "int8-static", "fp8", "int8-weight", "int4-weight"):
        assert DEFAULT_THRESHOLDS[mode] == {"mean_abs_dmu": 0.05, "pair_agreement_pooled": 0.98}


def test_parity_pairs_per_dimension_and_pooled():
    levels = np.linspace(0.0, 4.0, 9)
    ref = np.zeros((4, 2, 9))
    # item means on dim a: 4, 0, 4, 0 ; on dim b: 0, 4, 0, 4 (one-hot distributions)
    ref[[0, 2], 0, 8] = ref[[1, 3], 0, 0] = 1.0
    ref[[0, 2], 1, 0] = ref[[1, 3], 1, 8] = 1.0
    test = ref.copy()
    test[1] = test[0]  # item 1 now looks like item 0: the (0, 1) preference is lost on both dims
    rep = parity_report(ref, test, levels, ["a", "b"], {"a": [(0, 1), (2, 3)], "b": [(2, 3)]})
    assert rep["dimensions"]["a"]["pairs_compared"] == 2 and rep["dimensions"]["a"]["pair_agreement"] == 0.5
    assert rep["dimensions"]["b"]["pairs_compared"] == 1 and rep["dimensions"]["b"]["pair_agreement"] == 1.0
    assert rep["overall"]["pair_agreement"] == 0.5
    assert rep["overall"]["pair_agreement_pooled"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="unknown dimensions"):
        parity_report(ref, test, levels, ["a", "b"], {"c": [(0, 1)]})
