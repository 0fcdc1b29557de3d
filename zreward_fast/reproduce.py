"""``zreward-fast reproduce``: the Z-Reward method run as a whole, in miniature, on this CPU.

1. teacher cold start: a perception warm-up (one-pass score distributions of the cold-start
   images, standing in for the pretrained VLM the paper starts from), then reason-then-score SFT on
   reasoning texts written from the scene facts with the vision tower frozen;
2. GDSO on synthetic pairs (G rollouts per side from the teacher's own sampling, vision frozen), with the
   benchmark HPA on a validation seed logged as it trains (and, in full mode, three ablations:
   without L_pw, without L_pt, without the GRPO term);
3. labelling: the trained teacher writes RISD targets for a fresh image set;
4. RISD: a one-pass multi-query student distilled from those labels, and, as an upper bound, the
   same student distilled from targets peaked at the known scores;
5. the scalar Bradley-Terry reward model on the same pairs (the baseline the paper argues against);
6. export of the student to an int8 bundle with its parity report;
7. every model on the benchmark with a held-out seed (``zreward_fast.evaluation``);
8. the student's reward as a differentiable supervisor of a tiny scene generator
   (``zreward_fast.training.generator``), with the known scores to catch reward hacking.

Writes ``teacher-cold/``, ``teacher/`` (and ``teacher-without-*/`` for the ablations), ``student/``
(and ``student-init*/``: the same RISD from other random inits, full mode), ``student-gt/``, ``scalar/``, ``bundle/``,
``report.json``, ``table.md``, ``hpa_by_gap.png`` and ``reproduce.log`` under the output directory.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("zreward_fast.reproduce")

# every trainer of the run: warmup, then cosine decay (the full run's cold-start teacher went from
# 0.53 to 0.65 benchmark HPA against a constant learning rate, one run each; README, issue 10)
SCHEDULE = {"lr_scheduler_type": "cosine", "warmup_ratio": 0.05}
# the generator run against the student distilled from ground-truth targets
GENERATOR_GT = "mean, student from ground truth"
# GDSO ablations of the full mode: the row name and the GDSOConfig fields that remove one term
ABLATIONS = {"without L_pw": {"alpha_pw": 0.0}, "without L_pt": {"alpha_pt": 0.0}, "without GRPO": {"grpo_weight": 0.0}}


@dataclass
class ReproduceConfig:
    """Sizes of each stage; :meth:`quick` fits 5 minutes on 2 CPU cores, :meth:`full` 45."""

    seed: int = 0
    image_size: int = 128
    cold_images: int = 600  # x 4 dimensions = cold-start examples
    # the teacher's perception warm-up: one-pass score distributions of the cold-start images (the
    # student format) before the reason-then-score cold start, whose reasoning loss alone left the
    # vision tower unused (README, issue 10); 0 skips it and trains the vision tower in cold start
    perception_steps: int = 600
    cold_steps: int = 900
    train_pairs: int = 400
    # GDSOConfig fields of every GDSO run (the reasoning budget is the teachers' evaluation's too)
    gdso: dict[str, Any] = field(default_factory=lambda: dict(
        max_steps=80, pairs_per_step=4, num_rollouts=4, max_new_tokens=72, learning_rate=5e-4, beta=0.04))
    val_pairs: int = 32
    val_every: int = 40
    ablations: bool = True
    label_images: int = 300
    # the students start from random weights: starting them from the teacher's perception warm-up
    # (reward supervision on the known scores, too strong a "pretrained VLM") measured 0.82 for
    # that start alone and 0.69 after RISD from a 0.75 teacher in full mode (README)
    risd_steps: int = 600
    risd_batch: int = 16
    # students distilled from the same labels from other random inits (init 1, 2, ...): the spread
    # the student row carries. The quick config at seed 0 gave 0.64, 0.75, 0.70, 0.71 over four
    # inits against its teacher's 0.75 (docs/reproduce.md)
    student_inits: int = 4
    scalar_steps: int = 300
    export_pairs: int = 100
    # on 96 pairs one HPA moved by +-0.05 with the draw, as much as GDSO's quick gain (the same two
    # teachers: 0.71 -> 0.74 on 96 pairs, 0.66 -> 0.75 on 480; README)
    eval_pairs: int = 480
    eval_conflicts: int = 32
    generator_steps: int = 150
    generator_prompts: int = 8
    generator_optimizer: str = "normalized-sgd"  # see train_generator: Adam turns the reward's noise into a random walk
    generator_lr: float = 0.3
    # processes for the last stage's independent jobs (export, every model's evaluation, the
    # generator), each with an equal share of torch's threads: a teacher's reasoning generation
    # ran 1.2x faster on two threads than on one, so two one-thread jobs side by side finish that
    # stage ~1.6x sooner (2-core AMD EPYC); 1 runs them one after another in this process
    workers: int = 2

    @property
    def train_teacher_vision(self) -> bool:
        """After the perception warm-up the teacher's vision tower stays frozen (cold start, GDSO)."""
        return not self.perception_steps

    @classmethod
    def full(cls, seed: int = 0) -> "ReproduceConfig":
        return cls(seed=seed)

    @classmethod
    def quick(cls, seed: int = 0) -> "ReproduceConfig":
        # GDSO sees each training pair once, as in full mode: 40 steps over 96 pairs (1.7 epochs)
        # or 120 over 96 ended below the cold start (0.65, 0.61 against 0.71, 0.70; README).
        return cls(seed=seed, cold_images=150, perception_steps=200, cold_steps=200, train_pairs=320,
                   val_pairs=0, ablations=False, label_images=128, risd_steps=120,
                   risd_batch=8, student_inits=1, scalar_steps=60, export_pairs=24, eval_conflicts=32,
                   generator_steps=40, generator_prompts=4)


def _data(cfg: ReproduceConfig, out: Path) -> dict[str, Any]:
    """Cold-start reasonings, training pairs and labelling images, all from training seed streams."""
    from .training.coldstart import ReasoningRecord
    from .training.data import PairRecord, ScoredRecord, save_images
    from .training.pairs import training_pairs
    from .training.synthetic import DIMENSIONS, samples

    cold = list(samples(cfg.cold_images, seed=cfg.seed * 7 + 1, size=cfg.image_size))
    cold_paths = save_images(out / "cold", [s.image for s in cold], "c")
    cold_records = [ReasoningRecord(p, s.prompt, d, s.scene.reasoning(d), s.scores[d])
                    for p, s in zip(cold_paths, cold) for d in DIMENSIONS]
    # the same images and known scores, as one-pass targets for the teacher's perception warm-up
    perception = _known_targets([ScoredRecord(p, s.prompt, s.scores) for p, s in zip(cold_paths, cold)])
    pairs = training_pairs(cfg.seed, cfg.train_pairs, size=cfg.image_size)
    pair_records = []
    for i, p in enumerate(pairs):
        a, b = save_images(out / "pairs", list(p.images), f"p{i:05d}_")
        pair_records.append(PairRecord(p.prompt, p.dimension, (a, b), (p.scores[0][p.dimension], p.scores[1][p.dimension])))
    fresh = list(samples(cfg.label_images, seed=cfg.seed * 7 + 2, size=cfg.image_size))
    fresh_paths = save_images(out / "label", [s.image for s in fresh], "l")
    label_records = [ScoredRecord(p, s.prompt, s.scores) for p, s in zip(fresh_paths, fresh)]
    return {"cold": cold_records, "perception": perception, "pairs": pair_records, "label": label_records}


def _known_targets(records: list) -> list:
    """RISD records whose targets are soft distributions peaked at the known scores."""
    from .scale import ScoreScale
    from .training.data import RISDRecord, soft_targets

    return [RISDRecord(r.image, r.prompt, {d: soft_targets(v, ScoreScale()) for d, v in r.scores.items()})
            for r in records]


def _teacher_eval(rm: Any, cfg: ReproduceConfig, **ev: Any) -> dict:
    """The benchmark of a reasoning teacher (greedy reasoning up to the run's token budget)."""
    from .evaluation import evaluate

    return evaluate(rm, teacher=True, max_new_tokens=cfg.gdso["max_new_tokens"], **ev)


def _gdso(cold_dir: Path, cfg: ReproduceConfig, pairs: list, out_dir: Path, resume: bool = False,
          **overrides: Any) -> tuple[Any, list]:
    """GDSO from the cold-start teacher; returns the teacher and its validation HPA history
    (saved beside it, so a resumed run reports it too)."""
    from .modeling import ZRewardModel
    from .training.gdso import GDSOConfig, GDSOTrainer

    if resume and _saved(out_dir):
        history_file = out_dir / "gdso_validation.json"
        history = json.loads(history_file.read_text()) if history_file.is_file() else []
        return ZRewardModel.from_pretrained(out_dir), history
    rm = ZRewardModel.from_pretrained(cold_dir)
    gc = GDSOConfig(**{**cfg.gdso, **overrides}, train_vision=cfg.train_teacher_vision, seed=cfg.seed)
    trainer = GDSOTrainer(rm, gc, train_records=pairs)
    history = []
    step = 0
    while step < gc.max_steps:
        if cfg.val_pairs and cfg.val_every:
            r = _teacher_eval(trainer.reward_model, cfg, seed=cfg.seed + 1, pairs=cfg.val_pairs, conflicts=0,
                              size=cfg.image_size)
            history.append({"step": step, "val_hpa": r["hpa"]})
            logger.info("GDSO%s step %d: validation HPA %.3f", overrides or "", step, r["hpa"])
        step = min(gc.max_steps, step + (cfg.val_every or gc.max_steps))
        trainer.train(max_steps=step)
    losses = [h for h in trainer.state.history if "loss" in h]
    if losses:
        tail = losses[-min(10, len(losses)):]
        logger.info("GDSO%s done: reward %.3f -> %.3f (mean of first/last 10 steps)", overrides or "",
                    sum(h["reward"] for h in losses[:10]) / len(losses[:10]), sum(h["reward"] for h in tail) / len(tail))
    trainer.save_pretrained(out_dir)
    (out_dir / "gdso_validation.json").write_text(json.dumps(history))
    return trainer.reward_model, history


def _saved(directory: Path) -> bool:
    """A model directory that ``save_pretrained`` finished writing."""
    from .processing import PROCESSOR_CONFIG_NAME

    return (directory / "config.json").is_file() and (directory / PROCESSOR_CONFIG_NAME).is_file()


def _cold_start(cfg: ReproduceConfig, data: dict[str, Any]) -> Any:
    """The cold-start teacher: the perception warm-up (one-pass scores of the cold-start images),
    then reason-then-score SFT on the same images with the vision tower frozen; without the warm-up
    (``perception_steps=0``) the SFT trains the vision tower itself."""
    from .modeling import ZRewardModel
    from .testing import demo_model
    from .training.coldstart import ColdStartConfig, ColdStartTrainer
    from .training.risd import RISDConfig, RISDTrainer

    teacher = ZRewardModel(*demo_model(seed=cfg.seed, image_size=cfg.image_size))
    if cfg.perception_steps:
        RISDTrainer(teacher, RISDConfig(batch_size=16, learning_rate=5e-4, max_steps=cfg.perception_steps,
                                        train_vision=True, seed=cfg.seed, **SCHEDULE),
                    train_records=data["perception"]).train()  # trains the teacher's modules in place
    cold = ColdStartTrainer(teacher, ColdStartConfig(max_steps=cfg.cold_steps, learning_rate=1e-3, seed=cfg.seed,
                                                     train_vision=cfg.train_teacher_vision, **SCHEDULE), data["cold"])
    cold.train()
    return cold


def _risd(cfg: ReproduceConfig, records: list, out_dir: Path, resume: bool = False, init: int = 0) -> Any:
    """A student from random weights (``init`` picks them and the data order) distilled on ``records``."""
    from .modeling import ZRewardModel
    from .testing import demo_model
    from .training.risd import RISDConfig, RISDTrainer

    if resume and _saved(out_dir):
        return ZRewardModel.from_pretrained(out_dir).eval()

    rm = ZRewardModel(*demo_model(seed=cfg.seed + 1 + init, image_size=cfg.image_size))
    rc = RISDConfig(batch_size=cfg.risd_batch, learning_rate=5e-4, max_steps=cfg.risd_steps, train_vision=True,
                    seed=cfg.seed + init, **SCHEDULE)
    trainer = RISDTrainer(rm, rc, train_records=records)
    trainer.train()
    trainer.save_pretrained(out_dir)
    return ZRewardModel.from_pretrained(out_dir).eval()


def _plot(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in rows.items():
        gaps = sorted(r["gaps"], key=float)
        ax.plot([float(g) for g in gaps], [r["gaps"][g] for g in gaps], marker="o", label=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("known score gap of the pair")
    ax.set_ylabel("HPA (held-out benchmark)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    ax.set_title("HPA against the gap, every model")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reproduce(out_dir: str | Path, quick: bool = False, seed: int = 0, config: ReproduceConfig | None = None,
              resume: bool = False) -> dict:
    """Run the whole method (module docstring) and return the report written to ``report.json``.

    With ``resume``, stages whose models a previous run with the same settings saved under
    ``out_dir`` load them instead of training again (the data are deterministic in the seed)."""
    import torch

    from .evaluation import format_table
    from .modeling import ZRewardModel
    from .testing import demo_model
    from .training.data import read_manifest
    from .training.labelling import label_risd_targets
    from .export.parity import check_thresholds
    from .runtime.bundle import resolve_quant_mode
    from .training.scalar import VALUE_HEAD_FILE, ScalarConfig, ScalarRewardModel, ScalarTrainer
    from .training.teacher import default_engine

    cfg = config or (ReproduceConfig.quick(seed) if quick else ReproduceConfig.full(seed))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reproduce.log").write_text("")  # appended to (O_APPEND) by this process and the job workers
    root, handler = _log_to(out / "reproduce.log")
    t0, times = time.perf_counter(), {}

    def lap(name: str) -> None:
        times[name] = round(time.perf_counter() - t0 - sum(times.values()), 1)
        logger.info("%s done in %.1f s", name, times[name])

    try:
        torch.manual_seed(cfg.seed)
        logger.info("reproduce %s: %s", "quick" if quick else "full", dataclasses.asdict(cfg))
        data = _data(cfg, out / "data")
        lap("data")

        if not (resume and _saved(out / "teacher-cold")):
            _cold_start(cfg, data).save_pretrained(out / "teacher-cold")
        lap("teacher cold start")

        rm_teacher, gdso_history = _gdso(out / "teacher-cold", cfg, data["pairs"], out / "teacher", resume)
        lap("GDSO")
        ablations = list(ABLATIONS) if cfg.ablations else []
        for name in ablations:
            _gdso(out / "teacher-cold", dataclasses.replace(cfg, val_pairs=0), data["pairs"], _ablation_dir(out, name),
                  resume, **ABLATIONS[name])
        if ablations:
            lap("GDSO ablations")

        labels = out / "data" / "risd_teacher.jsonl"
        if not (resume and labels.is_file()):
            engine = default_engine(rm_teacher, cfg.gdso["max_new_tokens"], do_sample=False)
            label_risd_targets(rm_teacher.eval(), data["label"], labels, engine=engine)
        lap("labelling")
        teacher_labels = read_manifest(labels, "risd")
        _risd(cfg, teacher_labels, out / "student", resume)
        _risd(cfg, _known_targets(data["label"]), out / "student-gt", resume)
        lap("RISD")

        if not (resume and (out / "scalar" / VALUE_HEAD_FILE).is_file()):
            scalar = ScalarRewardModel(ZRewardModel(*demo_model(seed=cfg.seed + 1, image_size=cfg.image_size)))
            ScalarTrainer(scalar, ScalarConfig(max_steps=cfg.scalar_steps, seed=cfg.seed, **SCHEDULE), data["pairs"]).train()
            scalar.save_pretrained(out / "scalar")
        lap("scalar reward model")

        ev = dict(seed=cfg.seed + 10_000, pairs=cfg.eval_pairs, conflicts=cfg.eval_conflicts, size=cfg.image_size)
        jobs = [("teacher, cold start only", "teacher", out / "teacher-cold"), ("teacher, GDSO", "teacher", out / "teacher")]
        jobs += [(f"teacher, GDSO {name}", "teacher", _ablation_dir(out, name)) for name in ablations]
        jobs += [("student int8 bundle", "export", out), ("generator", "generator", out),
                 ("scalar reward model (BT)", "scalar", out / "scalar"),
                 ("student, RISD from the GDSO teacher", "model", out / "student"),
                 ("student, RISD from ground truth", "model", out / "student-gt")]  # longest first
        results, job_seconds = _run_jobs(jobs, cfg, ev, resume, out / "reproduce.log")
        parity, rows_bundle = results.pop("student int8 bundle")
        generator = results.pop("generator")
        failures = check_thresholds(parity, resolve_quant_mode("int8"))
        rows = {name: results[name] for name in ["teacher, cold start only", "teacher, GDSO"]
                + [f"teacher, GDSO {name}" for name in ablations]
                + ["scalar reward model (BT)", "student, RISD from the GDSO teacher", "student, RISD from ground truth"]}
        rows["student int8 bundle"] = rows_bundle
        lap("export, evaluation and generator")

        student_row = rows["student, RISD from the GDSO teacher"]
        inits = _student_inits(cfg, teacher_labels, out, resume, student_row, ev)
        if inits:
            lap("student inits")

        table = format_table(rows)
        if inits:
            table += "\n\n" + _format_inits(inits, rows["teacher, GDSO"]["hpa"])
        held = claims(rows, generator)
        logger.info("issue 10's claims: %s", held)
        report = {
            "mode": "quick" if quick else "full", "config": dataclasses.asdict(cfg), "rows": rows,
            "gdso_validation": gdso_history, "claims": held, "parity": parity.get("overall", {}),
            "parity_failures": failures, "generator": generator, "student_inits": inits, "seconds": times, "job_seconds": job_seconds, "resumed": resume,
            "total_seconds": round(time.perf_counter() - t0, 1), "eval_seed": ev["seed"],
        }
        (out / "report.json").write_text(json.dumps(report, indent=1))
        (out / "table.md").write_text(table + "\n")
        _plot(rows, out / "hpa_by_gap.png")
        logger.info("table:\n%s", table)
        return report
    finally:
        root.removeHandler(handler)
        handler.close()


def _ablation_dir(out: Path, name: str) -> Path:
    return out / f"teacher-{name.replace(' ', '-')}"


def _job(name: str, kind: str, path: Path, cfg: ReproduceConfig, ev: dict, resume: bool) -> tuple[str, Any, float]:
    """One job of the last stage: a model's benchmark row, the export (parity and the bundle's
    row) or the generator runs. Models are loaded from what the run saved, in this process."""
    from .evaluation import evaluate

    t0 = time.perf_counter()
    if kind == "teacher":
        from .modeling import ZRewardModel

        result: Any = _teacher_eval(ZRewardModel.from_pretrained(path), cfg, **ev)
    elif kind == "model":
        result = evaluate(path, **ev)
    elif kind == "scalar":
        from .training.scalar import ScalarRewardModel

        result = evaluate(ScalarRewardModel.from_pretrained(path), **ev)
    elif kind == "export":
        result = (_export(path, cfg, resume), evaluate(path / "bundle", **ev))
    elif kind == "generator":
        from .modeling import ZRewardModel

        result = _generator(ZRewardModel.from_pretrained(path / "student").eval(),
                            ZRewardModel.from_pretrained(path / "student-gt").eval(), cfg, path)
    else:
        raise ValueError(f"unknown job kind {kind!r}")
    seconds = round(time.perf_counter() - t0, 1)
    logger.info("%s (%s) done in %.1f s", name, kind, seconds)
    return name, result, seconds


def _export(out: Path, cfg: ReproduceConfig, resume: bool) -> dict:
    """The student's int8 bundle; its parity report (read back from the manifest on resume)."""
    from .export.api import export_bundle

    if resume and (out / "bundle" / "manifest.json").is_file():
        return json.loads((out / "bundle" / "manifest.json").read_text())["parity"]
    if (out / "bundle").exists():
        shutil.rmtree(out / "bundle")
    return export_bundle(out / "student", out / "bundle", quantize="int8", num_pairs=cfg.export_pairs,
                         force=True, progress=False).parity


def _log_to(path: str | Path) -> tuple[logging.Logger, logging.Handler]:
    """The package's INFO log appended (O_APPEND: the run and its job workers share the file) to ``path``."""
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    root = logging.getLogger("zreward_fast")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return root, handler


def _worker_init(threads: int, log_path: str) -> None:
    import torch

    torch.set_num_threads(threads)
    _log_to(log_path)


def _run_jobs(jobs: list[tuple[str, str, Path]], cfg: ReproduceConfig, ev: dict, resume: bool,
              log_path: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """Run ``jobs`` (independent of each other) in ``cfg.workers`` spawned processes sharing
    torch's threads, or one after another here with ``workers=1``; results and seconds by name."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    if cfg.workers <= 1:
        done = [_job(name, kind, path, cfg, ev, resume) for name, kind, path in jobs]
    else:
        threads = max(1, torch.get_num_threads() // cfg.workers)
        with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init, initargs=(threads, str(log_path))) as pool:
            futures = [pool.submit(_job, name, kind, path, cfg, ev, resume) for name, kind, path in jobs]
            done = [f.result() for f in futures]
    return {name: result for name, result, _ in done}, {name: seconds for name, _, seconds in done}


def _student_inits(cfg: ReproduceConfig, labels: list, out: Path, resume: bool, first: dict, ev: dict) -> dict:
    """The RISD student again from ``cfg.student_inits - 1`` other random inits on the same teacher
    labels: how much of the student's distance to its teacher is the draw of its init."""
    import statistics

    from .evaluation import evaluate

    if cfg.student_inits <= 1:
        return {}
    hpa = [first["hpa"]]
    for init in range(1, cfg.student_inits):
        student = _risd(cfg, labels, out / f"student-init{init}", resume, init=init)
        hpa.append(evaluate(student, **ev)["hpa"])
        logger.info("student init %d: HPA %.3f", init, hpa[-1])
    return {"hpa": hpa, "mean": statistics.fmean(hpa), "std": statistics.stdev(hpa), "min": min(hpa), "max": max(hpa)}


def _format_inits(inits: dict, teacher_hpa: float) -> str:
    return (f"RISD student over {len(inits['hpa'])} random inits on the same teacher labels: HPA "
            f"{inits['mean']:.3f} +- {inits['std']:.3f} (min {inits['min']:.3f}, max {inits['max']:.3f}; "
            f"each: {', '.join(f'{h:.3f}' for h in inits['hpa'])}); teacher {teacher_hpa:.3f}.")


def claims(rows: dict[str, dict], generator: dict[str, dict]) -> dict[str, bool]:
    """The learning claims of issue 10's "done means", each as this run measured it."""
    teacher, student = rows["teacher, GDSO"], rows["student, RISD from the GDSO teacher"]

    def rises(h: dict) -> bool:
        return h["known"][-1] > h["known"][0] + 0.1

    return {
        "GDSO teacher above its cold start (+0.05 HPA)": teacher["hpa"] > rows["teacher, cold start only"]["hpa"] + 0.05,
        "GDSO teacher better calibrated than its cold start (NLL -0.5)":
            teacher["nll"] < rows["teacher, cold start only"]["nll"] - 0.5,
        "RISD student within 0.03 HPA of its teacher": student["hpa"] >= teacher["hpa"] - 0.03,
        "student conflict accuracy above the scalar model's":
            student["conflict_accuracy"] > rows["scalar reward model (BT)"]["conflict_accuracy"],
        "known scores rise against the student's reward (+0.1)": rises(generator["mean"]),
        "known scores rise against the ground-truth student's reward (+0.1)": rises(generator[GENERATOR_GT]),
    }


def _generator(student: Any, student_gt: Any, cfg: ReproduceConfig, out: Path) -> dict:
    """Train the scene generator against the deployed student's reward (mean and risk-averse),
    against the known scores, and against the ground-truth student's reward (mean): a reward model
    that perceives, to tell a weak reward from a broken mechanism."""
    from .training import generator as gen

    common = dict(steps=cfg.generator_steps, seed=cfg.seed, lr=cfg.generator_lr, optimizer=cfg.generator_optimizer)
    prompts = gen.generator_prompts(cfg.seed, cfg.generator_prompts)
    histories = gen.compare_aggregations(gen.model_reward(student), prompts, **common)
    histories[GENERATOR_GT] = gen.train_generator(gen.model_reward(student_gt), prompts, aggregation="mean", **common)
    gen.plot_generator_history(histories, str(out / "generator.png"))
    return {name: {k: v for k, v in h.items() if k != "generator"} for name, h in histories.items()}
