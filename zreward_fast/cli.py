"""The ``zreward-fast`` command line."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .dimensions import DIMENSIONS
from .runtime.bundle import BACKENDS, FALLBACKS, GDN_FORMS, QUANT_ALIASES, QUANT_MODES, QUANT_TOOLS, SMOOTHINGS
from .runtime.openvino_backend import PRECISIONS


def _print_scores(scores: dict, levels: Sequence[float]) -> None:
    head = "  ".join(f"{x:>5g}" for x in levels)
    print(f"{'dimension':<13} {'mean':>6} {'std':>6}   p({head})")
    for dim, r in scores.items():
        probs = "  ".join(f"{p:5.3f}" for p in r.probs)
        print(f"{dim:<13} {r.mean:6.3f} {r.std:6.3f}   {probs}")


def _score_bundle(args: argparse.Namespace) -> int:
    # The runtime path imports no torch: `score --bundle` works in a torch-free environment.
    from .imaging import ImageError
    from .runtime import BundleError, Scorer

    try:
        scorer = Scorer(args.bundle, revision=args.revision, local_files_only=args.local_files_only)
        (scores,) = scorer.score([args.image], [args.prompt], dimensions=args.dimensions)
    except (ImageError, BundleError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"scores": {d: r.to_dict() for d, r in scores.items()}}))
    else:
        _print_scores(scores, scorer.scale.levels)
    return 0


def _score_many(args: argparse.Namespace) -> int:
    """``score --images DIR | --manifest FILE | --table FILE --out FILE``: one row per image."""
    from . import bulk_scoring as bs
    from .evaluation import load_source
    from .hub import resolve
    from .imaging import ImageError

    if not args.out:
        print("error: --out FILE.jsonl|.csv|.parquet is required with --images, --manifest or --table", file=sys.stderr)
        return 2
    pairs: list = []
    try:
        if args.images:
            items, root = bs.folder_items(args.images, args.prompt), Path(args.images).resolve()
        elif args.manifest:
            (items, pairs), root = bs.manifest_items(args.manifest), Path(args.manifest).resolve().parent
        else:
            items, root = bs.table_items(args.table, args.image_column, args.prompt_column), Path(args.table).resolve().parent
        source = args.bundle or args.model or args.url
        if args.ray:  # each Ray worker loads the source itself
            scorer = None
            counts = bs.score_items_ray(str(resolve(source, args.revision, args.local_files_only)) if not args.url else source, items,
                                        args.out, address=args.ray, resume=args.resume, batch_size=args.batch_size,
                                        workers=args.workers, dimensions=args.dimensions)
        else:
            scorer = load_source(source, revision=args.revision, local_files_only=args.local_files_only)
            counts = bs.score_items(scorer, items, args.out, resume=args.resume, batch_size=args.batch_size,
                                    workers=args.workers, dimensions=args.dimensions)
        rows = bs.read_rows(args.out)
    except (ImageError, ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dims = list(args.dimensions or getattr(scorer, "dimensions", None) or DIMENSIONS)
    print(f"{counts['total']} images: {counts['scored']} scored, {counts['errors']} unreadable, "
          f"{counts['skipped']} already in {args.out}")
    print(f"{'dimension':<13} {'mean':>6} {'std':>6} {'images':>7}")
    for d, st in bs.summarize(rows, dims).items():
        print(f"{d:<13} {st['mean']:6.3f} {st['std']:6.3f} {st['images']:7d}")
    if pairs:
        hpa = bs.pair_hpa(rows, pairs, root)
        print("HPA on the manifest's pairs: " + ", ".join(f"{k} {v:.3f}" for k, v in hpa.items()))
    if args.plot:
        bs.plot_histograms(rows, dims, args.plot)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    if args.images or args.manifest or args.table:
        return _score_many(args)
    if args.image is None or args.prompt is None:
        print("error: give --image and --prompt, or --images DIR / --manifest FILE / --table FILE with --out",
              file=sys.stderr)
        return 2
    if args.url is not None:
        print("error: --url scores folders, manifests and tables (--images, --manifest, --table)", file=sys.stderr)
        return 2
    if args.bundle is not None:
        return _score_bundle(args)
    from .imaging import ImageError, load_image
    from .modeling import ZRewardModel

    try:
        image = load_image(args.image)
    except ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        model = ZRewardModel.from_pretrained(args.model, device=args.device, revision=args.revision,
                                             local_files_only=args.local_files_only)
        (scores,) = model.score([image], [args.prompt], dimensions=args.dimensions)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"scores": {d: r.to_dict() for d, r in scores.items()}}))
    else:
        _print_scores(scores, model.scale.levels)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate, format_dimensions, format_table

    source = args.bundle or args.model
    runtime = {"backend": args.backend, "precision": args.precision}
    if args.model and runtime != {"backend": "onnxruntime", "precision": "f32"}:
        print("error: --backend and --precision choose what runs a --bundle; a --model runs in PyTorch", file=sys.stderr)
        return 2
    try:
        report = evaluate(source, seed=args.seed, pairs=args.pairs, conflicts=args.conflicts,
                          teacher=args.teacher, progress=True, revision=args.revision,
                          local_files_only=args.local_files_only,
                          # eval measures a precision's scores itself: the load-time gate would stop it
                          **(dict(runtime, check_parity=False) if args.bundle else {}))
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    label = Path(source).name or str(source)
    if args.bundle and args.backend != "onnxruntime":
        label += f" ({args.backend} {args.precision})"
    print(format_table({label: report}))
    print()
    print(format_dimensions(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    import dataclasses

    from .reproduce import ReproduceConfig, reproduce

    config = (ReproduceConfig.quick if args.quick else ReproduceConfig.full)(args.seed)
    if args.workers is not None:
        config = dataclasses.replace(config, workers=args.workers)
    report = reproduce(args.out, quick=args.quick, seed=args.seed, config=config, resume=args.resume)
    print((Path(args.out) / "table.md").read_text())
    print(f"report: {Path(args.out) / 'report.json'} ({report['total_seconds']:.0f} s)")
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from .modeling import ZRewardModel
    from .testing import tiny_model

    model, processor = tiny_model(seed=args.seed, image_size=args.image_size)
    ZRewardModel(model, processor).save_pretrained(args.out)
    print(f"wrote a tiny random Qwen3.5 reward model to {args.out}")
    return 0


def _load_model(model_dir: str | None, tiny_seed: int):
    from .modeling import ZRewardModel
    from .testing import tiny_model

    if model_dir:
        return ZRewardModel.from_pretrained(model_dir)
    model, processor = tiny_model(seed=tiny_seed)
    return ZRewardModel(model, processor)


def cmd_train(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.algorithm == "risd":
        from .training.risd import RISDConfig as Config, RISDTrainer as Trainer
    else:
        from .training.gdso import GDSOConfig as Config, GDSOTrainer as Trainer
    overrides = {"max_steps": args.max_steps} if args.max_steps is not None else {}
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    try:
        config = Config.from_file(args.config, **overrides)
        trainer = Trainer(_load_model(config.model_dir, config.tiny_seed), config)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.resume_from:
        trainer.load_checkpoint(args.resume_from)
    state = trainer.train()
    out = f"{config.output_dir}/final"
    trainer.save_pretrained(out)
    losses = [h["loss"] for h in state.history if "loss" in h]
    summary = {"steps": state.step, "skipped_batches": state.skipped_batches,
               "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None, "saved": out}
    if trainer.eval_records:
        summary["eval"] = trainer.evaluate()
    if trainer.accelerator.is_main_process:
        print(json.dumps(summary, indent=1))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export.api import ExportParityError, export_bundle
    from .hub import resolve

    try:
        benchmark = json.loads(Path(args.benchmark).read_text()) if args.benchmark else None
        result = export_bundle(resolve(args.model, args.revision, args.local_files_only), args.out, quantize=args.quantize, calib_dir=args.calib, gdn=args.gdn,
                               force=args.force, num_pairs=args.pairs, overwrite=args.overwrite, benchmark=benchmark,
                               fallback=args.fallback, smooth=args.smooth, quant_tool=args.tool)
    except ExportParityError as e:
        print(f"error: {e}", file=sys.stderr)
        print(json.dumps(e.report.get("overall", {}), indent=1), file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    overall = result.parity.get("overall", {})
    print(json.dumps({"bundle": str(result.path), "quantization": result.manifest["quantization"]["mode"],
                      "gdn": result.manifest["gdn"], "parity_overall": overall, "failures": result.failures}, indent=1))
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from .modeling import ZRewardModel

    try:
        rm = ZRewardModel.from_base(args.base, image_size=args.image_size, dimensions=args.dimensions,
                                    revision=args.revision)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rm.save_pretrained(args.out)
    p = rm.processor
    print(json.dumps({"out": args.out, "dimensions": list(rm.dimensions), "score_tokens": list(rm.scale.tokens),
                      "image_size": p.image_size, "vocab_size": len(p.tokenizer)}, indent=1))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_to_hub
    from .runtime import BundleError

    try:
        url = push_to_hub(args.dir, args.repo, revision=args.revision, private=args.private or None)
    except (BundleError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(url)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .runtime import BundleError
    from .runtime.server import run_server

    config = {f: getattr(args, f) for f in _server_fields() if getattr(args, f) is not None}
    if args.api_key is not None:
        print("warning: --api-key shows in the process list (ps, /proc); use $ZREWARD_API_KEY or --api-key-file",
              file=sys.stderr)
    if args.api_key_file is not None:
        if args.api_key is not None:
            print("error: give --api-key or --api-key-file, not both", file=sys.stderr)
            return 2
        try:
            config["api_key"] = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            print(f"error: cannot read --api-key-file: {e}", file=sys.stderr)
            return 2
    from .hub import resolve

    try:
        run_server(str(resolve(args.bundle, args.revision, args.local_files_only)), host=args.host, port=args.port, providers=args.providers,
                   parallel_runs=args.parallel_runs, backend=args.backend, precision=args.precision,
                   check_parity=args.check_parity, **config)
    except (BundleError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# short names RL trainers' docs use for the most-tuned server fields, beside the full ones
SERVER_FLAG_ALIASES = {"max_batch_size": "--max-batch", "max_queue": "--queue-size", "request_timeout_s": "--timeout-s"}


def _server_fields() -> dict:
    """ServerConfig's fields by name (one home for the server's settings: every one is a flag)."""
    import dataclasses

    from .runtime.server import ServerConfig

    return {f.name: f for f in dataclasses.fields(ServerConfig)}


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    """``--field-name`` for every ServerConfig field (default: the config's own)."""
    for name, f in _server_fields().items():
        flags = ["--" + name.replace("_", "-")] + ([SERVER_FLAG_ALIASES[name]] if name in SERVER_FLAG_ALIASES else [])
        if name == "api_key":
            parser.add_argument(*flags, dest=name, default=None,
                                help="require this key; visible to every user in the process list: prefer "
                                     "$ZREWARD_API_KEY (the default, if set) or --api-key-file")
            parser.add_argument("--api-key-file", default=None, help="read the required key from this file")
        elif f.type in (bool, "bool"):
            parser.add_argument(*flags, dest=name, default=None, action=argparse.BooleanOptionalAction,
                                help=f"default: {f.default}")
        else:
            kind = float if f.type in (float, "float") else int
            parser.add_argument(*flags, dest=name, type=kind, default=None, help=f"default: {f.default}")


REVISION_HELP = "with a hub repo id (owner/name) for --model/--bundle: the branch, tag or commit to load"


def _add_hub_args(p: argparse.ArgumentParser) -> None:
    """--revision and --local-files-only, for the commands that load a model or bundle by repo id."""
    p.add_argument("--revision", help=REVISION_HELP)
    p.add_argument("--local-files-only", action="store_true",
                   help="with a hub repo id: read the hub cache only, never the network (as transformers' "
                        "local_files_only; HF_HUB_OFFLINE=1 does the same)")


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    """--backend and --precision: what runs a bundle's graphs (the runtime ``Scorer``'s arguments)."""
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS,
                   help="what runs the bundle's graphs: onnxruntime (default) or OpenVINO's CPU plugin")
    p.add_argument("--precision", default="f32", choices=sorted(PRECISIONS),
                   help="OpenVINO's inference precision (default f32, the parity report's; bf16 where the CPU has it)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zreward-fast", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="score one image, or a folder, manifest or table of them, on every dimension")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="directory (or hub repo id) of a saved ZRewardModel (model + processor)")
    src.add_argument("--bundle", help="directory (or hub repo id) of an exported bundle (ONNX runtime)")
    src.add_argument("--url", help="a running `zreward-fast serve` (folders, manifests and tables)")
    what = s.add_mutually_exclusive_group()
    what.add_argument("--image", help="one image file (PNG, JPEG, WebP, ...)")
    what.add_argument("--images", help="a folder, scored recursively; prompts from --prompt or prompts.jsonl/.csv in it")
    what.add_argument("--manifest", help="a scored, pairs or risd manifest (pairs: HPA is printed)")
    what.add_argument("--table", help="a CSV or Parquet table with image and prompt columns")
    s.add_argument("--prompt", help="the generation prompt (with --images: the prompt of every image)")
    s.add_argument("--out", help="output of --images/--manifest/--table: .jsonl, .csv or .parquet, one row per image")
    s.add_argument("--resume", action="store_true", help="skip the images already in --out (after a crash)")
    s.add_argument("--workers", type=int, default=4,
                   help="threads decoding images ahead of the scorer (with --ray: Ray workers, one scorer each)")
    s.add_argument("--ray", metavar="local|ADDRESS", help="run on Ray Data: a local Ray, or the address of a cluster")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--plot", help="write a PNG of each dimension's histogram of means")
    s.add_argument("--image-column", default="image")
    s.add_argument("--prompt-column", default="prompt")
    _add_hub_args(s)
    s.add_argument("--dimensions", nargs="+", choices=DIMENSIONS, default=None)
    s.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=cmd_score)

    e = sub.add_parser("export", help="export a student to an ONNX bundle (optionally quantized), with a parity report")
    e.add_argument("--model", required=True, help="directory of a saved ZRewardModel")
    e.add_argument("--out", required=True, help="bundle directory to write")
    e.add_argument("--quantize", default="none", choices=[*QUANT_MODES, *QUANT_ALIASES],
                   help="int8 = dynamic per-channel (CPU); int8-weight / int4-weight = weight-only, block-wise "
                        "(CPU, MatMulNBits); int8-static and fp8 are QDQ calibrated on images")
    e.add_argument("--calib", default=None, help="directory of calibration images (default: synthetic images)")
    e.add_argument("--gdn", default="decomposed", choices=GDN_FORMS,
                   help="Gated DeltaNet decomposed into standard ops (default: any back end, and the faster "
                        "form on onnxruntime's CPU EP), or as onnxruntime's com.microsoft contrib ops")
    e.add_argument("--fallback", default="auto", choices=FALLBACKS,
                   help="int8, int8-weight: keep the layers most sensitive to the quantization in float, "
                        "as measured on the calibration images (default), or quantize every candidate")
    e.add_argument("--smooth", default="auto", choices=SMOOTHINGS,
                   help="int8: move each MLP's activation outliers into its weights first (SmoothQuant, "
                        "power-of-two scales from the calibration images; default), or not")
    e.add_argument("--tool", default="auto", choices=QUANT_TOOLS,
                   help="quantizer of int8-static and fp8: NVIDIA ModelOpt's ONNX PTQ (pip install "
                        "nvidia-modelopt[onnx]), onnxruntime's, or auto (ModelOpt for fp8 where installed)")
    e.add_argument("--pairs", type=int, default=200, help="held-out synthetic pairs for the parity report")
    e.add_argument("--force", action="store_true", help="write the bundle even if it misses its parity thresholds")
    e.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")
    _add_hub_args(e)
    e.add_argument("--benchmark", help="an `eval --json` report of the model, shown in the bundle's model card")
    e.set_defaults(func=cmd_export)

    sv = sub.add_parser("serve", help="serve a bundle over HTTP (FastAPI on uvicorn, dynamic batching)")
    sv.add_argument("--bundle", required=True, help="bundle directory or hub repo id")
    _add_hub_args(sv)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--providers", nargs="+", default=None, help="onnxruntime execution providers (default: CPU)")
    _add_backend_args(sv)
    sv.add_argument("--no-parity-check", dest="check_parity", action="store_const", const=False, default=None,
                    help="serve a precision below the export's (--precision bf16) even if its scores fail the parity "
                         "gate against the bundle's reference (checked at load by default)")
    sv.add_argument("--parallel-runs", type=int, default=1,
                    help="split each batch into this many parts run concurrently (CPU throughput; default 1)")
    _add_server_flags(sv)
    sv.set_defaults(func=cmd_serve)

    ini = sub.add_parser("init", help="turn a base Qwen3.5 checkpoint into a Z-Reward model (score and dimension "
                                      "tokens added and initialised, processor saved): the first step of training")
    ini.add_argument("--base", required=True, help="base checkpoint directory or hub repo id (e.g. Qwen/Qwen3.5-0.8B)")
    ini.add_argument("--out", required=True)
    ini.add_argument("--image-size", type=int, default=448, help="the square image bucket (a multiple of 32)")
    ini.add_argument("--dimensions", nargs="+", choices=DIMENSIONS, default=None)
    ini.add_argument("--revision", help=REVISION_HELP)
    ini.set_defaults(func=cmd_init)

    pu = sub.add_parser("push", help="upload a bundle (verified first) or a saved model to the Hugging Face hub")
    pu.add_argument("--dir", required=True, help="bundle or model directory")
    pu.add_argument("--repo", required=True, help="hub repo id, owner/name (created if missing)")
    pu.add_argument("--revision", help="branch to push to (created if missing; default main)")
    pu.add_argument("--private", action="store_true", help="create the repo private")
    pu.set_defaults(func=cmd_push)

    tr = sub.add_parser("train", help="train a teacher with GDSO or a student with RISD")
    tr.add_argument("algorithm", choices=["gdso", "risd"])
    tr.add_argument("--config", required=True, help="YAML or JSON file of GDSOConfig / RISDConfig fields")
    tr.add_argument("--max-steps", type=int, default=None)
    tr.add_argument("--output-dir", default=None)
    tr.add_argument("--resume-from", default=None, help="a checkpoint directory written by the trainer")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="measure a model or bundle on the synthetic benchmark (known scores)")
    src = ev.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="directory of a saved ZRewardModel")
    src.add_argument("--bundle", help="directory of an exported bundle")
    ev.add_argument("--seed", type=int, default=0, help="benchmark seed (training data never uses its streams)")
    ev.add_argument("--pairs", type=int, default=128, help="benchmark pairs, spread over dimensions and gaps")
    ev.add_argument("--conflicts", type=int, default=None, help="conflict pairs (default: pairs / 4)")
    ev.add_argument("--teacher", action="store_true", help="the model is a reasoning teacher: reason, then score")
    ev.add_argument("--json", default=None, help="also write the full report to this JSON file")
    _add_backend_args(ev)  # with --bundle: e.g. check OpenVINO at bf16 on the benchmark before serving it
    _add_hub_args(ev)
    ev.set_defaults(func=cmd_eval)

    rp = sub.add_parser("reproduce", help="run the whole method in miniature (cold start, GDSO, labelling, "
                                          "RISD, scalar baseline, int8 export, benchmark, generator)")
    rp.add_argument("--out", required=True, help="directory for the models, bundle, report and plots")
    rp.add_argument("--quick", action="store_true", help="the same steps, smaller (about 5 minutes on 2 cores)")
    rp.add_argument("--seed", type=int, default=0)
    rp.add_argument("--resume", action="store_true",
                    help="load the models an earlier run with the same settings saved in --out instead of training them")
    rp.add_argument("--workers", type=int, default=None,
                    help="processes for the export, evaluation and generator jobs, sharing torch's threads (default 2; "
                         "1 runs them one after another)")
    rp.set_defaults(func=cmd_reproduce)

    t = sub.add_parser("tiny", help="write a tiny random model (for tests and the demo; no download)")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--image-size", type=int, default=64)
    t.set_defaults(func=cmd_tiny)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
