"""The synthetic benchmark (benchmark and conflict pairs) and ``zreward_fast.evaluation``."""
from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest

from zreward_fast.cli import main
from zreward_fast.evaluation import evaluate, format_table
from zreward_fast.scale import ScoreResult, ScoreScale
from zreward_fast.training import pairs as P
from zreward_fast.training import synthetic as S

DIMS = S.DIMENSIONS


def _key(img) -> str:
    return hashlib.sha1(img.tobytes()).hexdigest()


# ---------------------------------------------------------------- benchmark pairs
def test_benchmark_pairs_are_deterministic_spread_and_differ_on_one_dimension_only():
    pairs = P.benchmark_pairs(seed=11, n=32)
    again = P.benchmark_pairs(seed=11, n=32)
    assert [_key(p.images[0]) + _key(p.images[1]) for p in pairs] == [_key(p.images[0]) + _key(p.images[1]) for p in again]
    assert Counter((p.dimension, p.gap) for p in pairs) == Counter({(d, g): 2 for d in DIMS for g in S.GAPS})
    for p in pairs:
        a, b = p.scores
        assert abs(a[p.dimension] - b[p.dimension]) == p.gap
        assert all(a[d] == b[d] for d in DIMS if d != p.dimension)
        assert (a, b) == (p.scenes[0].scores(), p.scenes[1].scores())
    # neither side is always the better one, and bases are not all clean
    assert 0 < sum(p.scores[0][p.dimension] > p.scores[1][p.dimension] for p in pairs) < len(pairs)
    assert min(max(p.scores[0][p.dimension], p.scores[1][p.dimension]) for p in pairs) < S.MAX_SCORE
    other = P.benchmark_pairs(seed=12, n=32)
    assert not {_key(p.images[0]) for p in pairs} & {_key(p.images[0]) for p in other}


def test_benchmark_seeds_are_apart_from_training_seeds():
    bench = {_key(img) for p in P.benchmark_pairs(seed=3, n=16) for img in p.images}
    train = {_key(s.image) for s in S.samples(16, seed=3)} | {_key(S.make_sample(i).image) for i in range(16)}
    assert not bench & train


def test_conflict_pairs_disagree_on_two_dimensions():
    pairs = P.conflict_pairs(seed=2, n=24)
    assert Counter((p.dimension, p.other) for p in pairs) == Counter(
        {(x, y): 2 for x in DIMS for y in DIMS if x != y})
    for p in pairs:
        a, b = p.scores
        assert a[p.dimension] - b[p.dimension] == p.gap > 0
        assert b[p.other] - a[p.other] == p.other_gap > 0
        assert all(a[d] == b[d] for d in DIMS if d not in (p.dimension, p.other))


def test_training_pairs_vary_the_unlabelled_dimensions_like_preference_data():
    """Labelled on one dimension by its exact gap; the other three differ in about half the pairs
    and in both directions (else "least degraded anywhere" wins every pair), or are held equal."""
    pairs = P.training_pairs(seed=4, n=48, size=64)
    assert Counter(p.dimension for p in pairs) == Counter({d: 12 for d in DIMS})
    for p in pairs:
        a, b = p.scores
        assert a[p.dimension] - b[p.dimension] == p.gap > 0
        assert (a, b) == (p.scenes[0].scores(), p.scenes[1].scores())
    others = [(a[d], b[d]) for p in pairs for a, b in [p.scores] for d in DIMS if d != p.dimension]
    differ = [x for x in others if x[0] != x[1]]
    assert 0.3 < len(differ) / len(others) < 0.7
    assert any(x > y for x, y in differ) and any(x < y for x, y in differ)
    # the labelled winner is worse on another dimension in some pairs: a conflict, as in the data
    assert any(a[d] < b[d] for p in pairs for a, b in [p.scores] for d in DIMS if d != p.dimension)
    held = P.training_pairs(seed=4, n=16, size=64, vary_others=False)
    assert all(a[d] == b[d] for p in held for a, b in [p.scores] for d in DIMS if d != p.dimension)
    train = {_key(img) for p in pairs for img in p.images}
    assert not train & {_key(img) for p in P.benchmark_pairs(seed=4, n=48, size=64) for img in p.images}


def test_alignment_errors_draw_what_another_prompt_asks_for_exactly():
    """An alignment error is only visible against the prompt: the degraded image is a perfect
    (alignment 4.0) rendering of the prompt that describes what was drawn."""
    pairs = [p for p in P.benchmark_pairs(seed=5, n=48) if p.dimension == "alignment"]
    kinds = Counter(e.kind for p in pairs for s in p.scenes for e in s.errors)
    assert set(kinds) == set(S.ERROR_COSTS), kinds  # every kind of error is exercised
    for p in pairs:
        for scene, img in zip(p.scenes, p.images):
            runs: list[list] = []
            for o in scene.drawn:
                if runs and (runs[-1][0].colour, runs[-1][0].shape) == (o.colour, o.shape):
                    runs[-1].append(o)
                else:
                    runs.append([o])
            honest = S.Scene(groups=[S.Group(r[0].colour, r[0].shape, len(r)) for r in runs],
                             noise_steps=scene.noise_steps, composition_steps=scene.composition_steps,
                             contrast_steps=scene.contrast_steps, floating=scene.floating,
                             wrong_shadows=scene.wrong_shadows, missing_shadows=scene.missing_shadows, seed=scene.seed)
            assert honest.scores()["alignment"] == S.MAX_SCORE
            assert _key(S.render(honest)) == _key(img)
    prompts = [p.prompt for p in P.benchmark_pairs(seed=5, n=64)]
    assert any(" left of " in t for t in prompts) and any(t.startswith("two ") for t in prompts)


def test_degrade_checks_its_drop_and_dimension():
    scene = S.random_scene(np.random.default_rng(0), {d: 4.0 for d in DIMS})
    with pytest.raises(ValueError, match="multiple of 0.5"):
        S.degrade(np.random.default_rng(0), scene, "realism", 0.3)
    with pytest.raises(ValueError, match="unknown dimension"):
        S.degrade(np.random.default_rng(0), scene, "sharpness", 1.0)
    assert S.degrade(np.random.default_rng(0), S.random_scene(np.random.default_rng(1), {"realism": 0.5}), "realism", 1.0) is None
    with pytest.raises(ValueError, match="gaps"):
        P.benchmark_pairs(0, 4, gaps=(0.3,))


def test_reasoning_states_the_facts_behind_each_score():
    scene = S.random_scene(np.random.default_rng(4), {"alignment": 3.0, "realism": 2.5, "aesthetics": 4.0, "plausibility": 3.5})
    assert "level 3" in scene.reasoning("realism")
    assert scene.reasoning("aesthetics") == "balanced composition and good contrast."
    assert "no shadow" in scene.reasoning("plausibility")
    assert scene.reasoning("alignment").count(";") == len(scene.errors) - 1


# ---------------------------------------------------------------- evaluate
class LookupScorer:
    """Scores from the known labels (found by image bytes), transformed by ``fn``."""

    scale = ScoreScale()

    def __init__(self, seed: int, n: int, fn=lambda s, d: s[d], one_hot: bool = True):
        self.table = {}
        for p in P.benchmark_pairs(seed, n) + P.conflict_pairs(seed, n // 4):
            for img, s in zip(p.images, p.scores):
                self.table[_key(img)] = s
        self.fn, self.one_hot = fn, one_hot

    def score(self, images, prompts, dimensions):
        out = []
        for img in images:
            s = self.table[_key(img)]
            row = {}
            for d in dimensions:
                mean = self.fn(s, d)
                probs = tuple(float(lv == s[d]) for lv in self.scale.levels) if self.one_hot else ()
                row[d] = ScoreResult(mean, 0.0, probs)
            out.append(row)
        return out


def test_evaluate_gives_an_oracle_full_marks_and_a_scalar_no_conflicts():
    oracle = evaluate(LookupScorer(7, 32), seed=7, pairs=32)
    assert oracle["hpa"] == oracle["margin_hpa"] == oracle["conflict_accuracy"] == 1.0
    assert set(oracle["gaps"]) == {str(g) for g in S.GAPS} and all(v == 1.0 for v in oracle["gaps"].values())
    for d in DIMS:
        v = oracle["dimensions"][d]
        assert v["hpa"] == 1.0 and v["plcc"] == pytest.approx(1.0) and v["srcc"] == pytest.approx(1.0)
        assert v["nll"] == pytest.approx(0.0, abs=1e-9) and v["ece"] == pytest.approx(0.0)
    # one scalar per image (the sum of the known scores) orders at most one side of a conflict
    scalar = evaluate(LookupScorer(7, 32, fn=lambda s, d: sum(s.values()), one_hot=False), seed=7, pairs=32)
    assert scalar["hpa"] == 1.0 and scalar["conflict_accuracy"] <= 0.25
    assert np.isnan(scalar["nll"])
    reverse = evaluate(LookupScorer(7, 32, fn=lambda s, d: -s[d]), seed=7, pairs=32)
    assert reverse["hpa"] == 0.0 and reverse["conflict_accuracy"] == 0.0
    const = evaluate(LookupScorer(7, 32, fn=lambda s, d: 2.0), seed=7, pairs=32)
    assert const["hpa"] == 0.5 and const["conflict_accuracy"] == 0.25
    table = format_table({"oracle": oracle, "scalar": scalar})
    assert table.count("\n") == 3 and "| oracle | 1.00 |" in table


def test_evaluate_runs_a_student_and_a_teacher(tiny):
    from zreward_fast import ZRewardModel

    rm = ZRewardModel(*tiny)
    student = evaluate(rm, seed=1, pairs=8, conflicts=2)
    assert 0.0 <= student["hpa"] <= 1.0 and student["pairs"] == 8 and student["conflicts"] == 2
    assert student["cost"] == {"forward_passes_per_image": 1.0, "generated_tokens_per_image": 0.0}
    assert all(np.isfinite(v["nll"]) for v in student["dimensions"].values())
    teacher = evaluate(rm, seed=1, pairs=4, conflicts=0, teacher=True, max_new_tokens=3)
    assert teacher["cost"]["forward_passes_per_image"] == 4.0
    assert 0 < teacher["cost"]["generated_tokens_per_image"] <= 4 * 3
    with pytest.raises(TypeError, match="cannot evaluate"):
        evaluate(object(), pairs=4)
    with pytest.raises(ValueError, match="at least 4"):
        evaluate(rm, pairs=2)


def test_cli_eval_prints_the_table_and_writes_json(tiny, tmp_path, capsys):
    from zreward_fast import ZRewardModel

    ZRewardModel(*tiny).save_pretrained(tmp_path / "m")
    assert main(["eval", "--model", str(tmp_path / "m"), "--pairs", "8", "--conflicts", "2",
                 "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "| model | HPA |" in out and "plausibility" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["pairs"] == 8 and set(report["dimensions"]) == set(DIMS)
    assert main(["eval", "--model", str(tmp_path / "missing")]) == 2
