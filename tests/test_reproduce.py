"""`zreward-fast reproduce --quick`: the whole method end to end, as CI runs it."""
from __future__ import annotations

import json
import math

import pytest

from zreward_fast.cli import main
from zreward_fast.training.synthetic import DIMENSIONS


@pytest.mark.slow
def test_reproduce_quick_runs_every_stage_and_reports_every_row(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # kernels' torch path: the interpreter is a correctness tool
    out = tmp_path / "repro"
    assert main(["reproduce", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    for d in ("teacher-cold", "teacher", "student", "student-gt", "scalar", "bundle"):
        assert (out / d).is_dir(), d
    for f in ("table.md", "hpa_by_gap.png", "generator.png", "reproduce.log", "data/risd_teacher.jsonl"):
        assert (out / f).is_file(), f
    rows = report["rows"]
    assert list(rows) == ["teacher, cold start only", "teacher, GDSO", "scalar reward model (BT)",
                          "student, RISD from the GDSO teacher", "student, RISD from ground truth", "student int8 bundle"]
    for name, r in rows.items():
        assert 0.0 <= r["hpa"] <= 1.0 and set(r["dimensions"]) == set(DIMENSIONS), name
        assert r["pairs"] == 48 and r["conflicts"] == 16
        assert name in printed
    # the cost column: the teacher reasons on every dimension, the student scores all four in one pass
    assert rows["teacher, GDSO"]["cost"]["forward_passes_per_image"] == 4
    assert rows["teacher, GDSO"]["cost"]["generated_tokens_per_image"] > 0
    assert rows["student, RISD from the GDSO teacher"]["cost"] == {"forward_passes_per_image": 1.0,
                                                                   "generated_tokens_per_image": 0.0}
    # one scalar per image cannot order both sides of a conflict; distributions exist only for the others
    assert rows["scalar reward model (BT)"]["conflict_accuracy"] <= 0.25
    assert math.isnan(rows["scalar reward model (BT)"]["nll"])
    assert all(math.isfinite(rows[n]["nll"]) for n in rows if n != "scalar reward model (BT)")
    # the bundle is the student, quantized: its parity report travels with it
    assert report["parity"]["mean_abs_dmu"] < 0.25
    # the generator trained on the known scores improves them (the reference the reward runs are read against)
    oracle = report["generator"]["oracle"]
    assert oracle["known"][-1] > oracle["known"][0] + 1.0
    for run in ("mean", "risk"):
        h = report["generator"][run]
        assert len(h["reward"]) == len(h["known"]) == len(h["gap"]) >= 2
    assert sum(report["seconds"].values()) < 600

    # --resume loads every saved model instead of training again (a smaller evaluation keeps this short)
    import dataclasses

    from zreward_fast.evaluation import evaluate
    from zreward_fast.reproduce import ReproduceConfig, reproduce

    small = dataclasses.replace(ReproduceConfig.quick(), eval_pairs=8, eval_conflicts=0, generator_steps=2)
    again = reproduce(out, quick=True, config=small, resume=True)
    assert again["resumed"] and set(again["rows"]) == set(rows)
    for stage in ("teacher cold start", "GDSO", "labelling", "RISD", "scalar reward model", "export"):
        assert again["seconds"][stage] < 0.2 * max(report["seconds"][stage], 1.0), (stage, again["seconds"])
    direct = evaluate(out / "student", seed=again["eval_seed"], pairs=8, conflicts=0)
    got = again["rows"]["student, RISD from the GDSO teacher"]["dimensions"]
    assert json.dumps(got, sort_keys=True) == json.dumps(direct["dimensions"], sort_keys=True)  # NaN-safe
