"""`zreward-fast reproduce --quick`: the whole method end to end, as CI runs it (one run, module scope)."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os

import pytest
import torch

from zreward_fast.cli import main
from zreward_fast.reproduce import GENERATOR_GT
from zreward_fast.training.synthetic import DIMENSIONS

pytestmark = pytest.mark.heavy  # about 5 minutes: `make test-heavy`, CI's second step

TEACHER_COLD, TEACHER = "teacher, cold start only", "teacher, GDSO"
SCALAR, STUDENT = "scalar reward model (BT)", "student, RISD from the GDSO teacher"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    # a fixed thread count: other test modules set one thread at import, and the float reduction order
    # changes the sampled rollouts, so the quick run's numbers depend on it (README, issue 10)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("repro") / "out"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:  # unset for the resume test too
        mp.delenv("TRITON_INTERPRET", raising=False)  # kernels' torch path: the interpreter is a correctness tool
        with contextlib.redirect_stdout(printed):
            assert main(["reproduce", "--quick", "--out", str(out)]) == 0
        yield out, json.loads((out / "report.json").read_text()), printed.getvalue()
    torch.set_num_threads(threads)


def test_every_stage_runs_and_reports_every_row(run):
    out, report, printed = run
    for d in ("teacher-cold", "teacher", "student", "student-gt", "scalar", "bundle"):
        assert (out / d).is_dir(), d
    for f in ("table.md", "hpa_by_gap.png", "generator.png", "reproduce.log", "data/risd_teacher.jsonl"):
        assert (out / f).is_file(), f
    rows = report["rows"]
    assert list(rows) == [TEACHER_COLD, TEACHER, SCALAR, STUDENT, "student, RISD from ground truth", "student int8 bundle"]
    for name, r in rows.items():
        assert 0.0 <= r["hpa"] <= 1.0 and set(r["dimensions"]) == set(DIMENSIONS), name
        assert r["pairs"] == 480 and r["conflicts"] == 32
        assert name in printed
    # the cost column: the teacher reasons on every dimension, the student scores all four in one pass
    assert rows[TEACHER]["cost"]["forward_passes_per_image"] == 4
    assert rows[TEACHER_COLD]["cost"]["generated_tokens_per_image"] > 0
    assert rows[STUDENT]["cost"] == {"forward_passes_per_image": 1.0, "generated_tokens_per_image": 0.0}
    # one scalar per image cannot order both sides of a conflict; distributions exist only for the others
    assert rows[SCALAR]["conflict_accuracy"] <= 0.25
    assert math.isnan(rows[SCALAR]["nll"])
    assert all(math.isfinite(rows[n]["nll"]) for n in rows if n != SCALAR)
    # the bundle is the student, quantized: its parity report travels with it
    assert report["parity"]["mean_abs_dmu"] < 0.25
    # the generator trained on the known scores improves them (the reference the reward runs are read against)
    oracle = report["generator"]["oracle"]
    assert oracle["known"][-1] > oracle["known"][0] + 1.0
    for name in ("mean", "risk", GENERATOR_GT):
        h = report["generator"][name]
        assert len(h["reward"]) == len(h["known"]) == len(h["gap"]) >= 2
    assert sum(report["seconds"].values()) < 600
    # the last stage's jobs ran in two processes: each job's own time, the stage's wall time below their sum
    jobs = report["job_seconds"]
    assert set(jobs) == set(rows) | {"generator"}
    assert report["seconds"]["export, evaluation and generator"] < 0.8 * sum(jobs.values()), (report["seconds"], jobs)


# Learning, each a number that could fail (issue 10's "done means"), on 480 held-out pairs.
def test_teachers_perceive_what_their_reasoning_names(run):
    """The perception warm-up: before it, the reason-then-score cold start left the vision tower
    unused (a blank image changed 1% of the reasoning tokens, realism HPA 0.33 in quick mode); with
    it, the realism reasoning reads the image (0.92-1.00 in five quick runs, two seeds)."""
    rows = run[1]["rows"]
    for name in (TEACHER_COLD, TEACHER):
        assert rows[name]["dimensions"]["realism"]["hpa"] >= 0.75, (name, rows[name]["dimensions"]["realism"])


def test_gdso_teacher_ranks_better_than_its_cold_start(run):
    """GDSO raises the teacher's held-out HPA above its cold start's: +0.09 (seed 0) and +0.03
    (seed 1) on 480 pairs in quick mode, +0.12 and +0.13 in the full runs (README). The claim's
    +0.05 margin is recorded, not asserted: seed 1's quick run misses it."""
    rows = run[1]["rows"]
    assert rows[TEACHER]["hpa"] > rows[TEACHER_COLD]["hpa"], (rows[TEACHER]["hpa"], rows[TEACHER_COLD]["hpa"])


def test_gdso_calibrates_the_teachers_distributions(run):
    """GDSO's pointwise term trains the score after the teacher's own sampled reasoning: the NLL of
    the known level on held-out images falls (3.3-3.8 -> 2.1-2.6 in twelve quick runs, 4.4 -> 1.9 in
    the full run)."""
    rows = run[1]["rows"]
    assert rows[TEACHER]["nll"] < rows[TEACHER_COLD]["nll"] - 0.5, (rows[TEACHER]["nll"], rows[TEACHER_COLD]["nll"])
    assert run[1]["claims"]["GDSO teacher better calibrated than its cold start (NLL -0.5)"]


def test_per_dimension_student_gets_conflicts_the_scalar_model_cannot(run):
    rows = run[1]["rows"]
    assert rows[STUDENT]["conflict_accuracy"] > rows[SCALAR]["conflict_accuracy"]


def test_generator_known_scores_rise_against_a_student_that_perceives(run):
    """The mechanism of part 3: gradients through a reward model that has learned the dimensions
    (here the student distilled from ground-truth targets) raise the known scores."""
    h = run[1]["generator"][GENERATOR_GT]
    assert h["known"][-1] > h["known"][0] + 0.1, h["known"]


def test_report_states_each_claim_as_the_rows_measure_it(run):
    """`report["claims"]` records the learning claims, held or not: the ones asserted above agree
    with it. The other three held in the full run (all six at seed 0; README) but not reliably at
    this size, so they are recorded there, not asserted: GDSO +0.05 above its cold start (seed 0
    +0.09, seed 1 +0.03 on 480 pairs); the student within 0.03 of its teacher (seed 0: 0.64 against
    0.75, seed 1: 0.77 against 0.76; the quick student, trained from scratch on 128 teacher-labelled
    images, does not learn the teacher's aesthetics, 0.47-0.62 against 0.88, while the same student
    on ground-truth targets reaches 0.88); the known scores rising against the deployed student."""
    claims = run[1]["claims"]
    assert len(claims) == 6 and all(isinstance(v, bool) for v in claims.values())
    assert claims["student conflict accuracy above the scalar model's"]
    assert claims["known scores rise against the ground-truth student's reward (+0.1)"]


def test_resume_loads_every_saved_model(run):
    import dataclasses

    from zreward_fast.evaluation import evaluate
    from zreward_fast.reproduce import ReproduceConfig, reproduce

    out, report, _ = run
    # one more student init (the full mode's spread over inits), trained briefly: the others load
    small = dataclasses.replace(ReproduceConfig.quick(), eval_pairs=8, eval_conflicts=0, generator_steps=2,
                                student_inits=2, risd_steps=4)
    again = reproduce(out, quick=True, config=small, resume=True)
    assert again["resumed"] and set(again["rows"]) == set(report["rows"])
    inits = again["student_inits"]
    assert (out / "student-init1" / "config.json").is_file() and len(inits["hpa"]) == 2
    assert inits["hpa"][0] == again["rows"][STUDENT]["hpa"]
    assert inits["min"] == min(inits["hpa"]) and abs(inits["mean"] - sum(inits["hpa"]) / 2) < 1e-12
    assert "2 random inits" in (out / "table.md").read_text()
    assert report["student_inits"] == {}  # quick mode trains one student
    for stage in ("teacher cold start", "GDSO", "labelling", "RISD", "scalar reward model"):
        assert again["seconds"][stage] < 0.2 * max(report["seconds"][stage], 1.0), (stage, again["seconds"])
    # the export job reads the parity back from the bundle (and evaluates the bundle on 8 pairs)
    bundle = "student int8 bundle"
    assert again["job_seconds"][bundle] < 0.2 * report["job_seconds"][bundle], (again["job_seconds"], report["job_seconds"])
    assert again["parity"] == report["parity"]
    direct = evaluate(out / "student", seed=again["eval_seed"], pairs=8, conflicts=0)
    got = again["rows"][STUDENT]["dimensions"]  # evaluated in a job worker process
    assert json.dumps(got, sort_keys=True) == json.dumps(direct["dimensions"], sort_keys=True)  # NaN-safe
    # the jobs one after another in this process: the same rows
    serial = reproduce(out, quick=True, config=dataclasses.replace(small, workers=1), resume=True)
    _assert_close(serial["rows"], again["rows"])  # one torch thread there, two here: float order only


def _assert_close(a, b, path="rows"):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in set(a) - {"seconds"}:  # wall time
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, float) and not math.isnan(a):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), path
    else:
        assert a == b or (isinstance(a, float) and math.isnan(b)), path


@pytest.mark.skipif(not os.environ.get("ZREWARD_REPRODUCE_FULL"),
                    reason="the full run takes about 30 minutes here: set ZREWARD_REPRODUCE_FULL=1 (seed: ZREWARD_REPRODUCE_SEED)")
def test_full_run_holds_every_learning_claim(tmp_path):
    """On demand: the full mode, whose results are committed (seed 0 holds all six claims; seed 1
    four: its student is 0.04 below its teacher, and the generator hacks its way back by the end)."""
    from zreward_fast.reproduce import reproduce

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("TRITON_INTERPRET", raising=False)
            report = reproduce(tmp_path / "full", seed=int(os.environ.get("ZREWARD_REPRODUCE_SEED", "0")))
    finally:
        torch.set_num_threads(threads)
    assert all(report["claims"].values()), report["claims"]
