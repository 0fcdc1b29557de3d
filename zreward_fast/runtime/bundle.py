"""Reading, verifying and writing export bundles (``docs/bundle.md``). Torch-free.

A bundle is trusted only as a whole: every file in the directory except ``manifest.json`` must be
listed in the manifest with its size and sha256, and every listed file must be there and match.
Unlisted (extra) files are refused too, not ignored: a stray ``decoder.onnx.data`` from another
export, or a file dropped in by hand, would otherwise ride along with a bundle that "verified".
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

FORMAT_NAME = "zreward-fast-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
GRAPH_NAMES = ("vision", "decoder")

# The graphs' interface: the exporter writes these names, the runtime feeds and reads them.
VISION_INPUTS = ("pixel_values",)
VISION_OUTPUTS = ("image_features",)
DECODER_INPUTS = ("input_ids", "attention_mask", "position_ids", "image_features", "query_positions")
DECODER_OUTPUTS = ("log_probs", "means")
# Gated DeltaNet forms of decoder.onnx: onnxruntime's com.microsoft kernels, or standard ops only
# (the portable path, for TensorRT)
GDN_FORMS = ("contrib", "decomposed")
# What can run a bundle's graphs (``Scorer(backend=...)``): the same files for both
BACKENDS = ("onnxruntime", "openvino")
# Quantization modes a bundle can carry, and the short names the command line also accepts
# (``int8-weight``/``int4-weight``: weight-only, block-wise ``com.microsoft::MatMulNBits``, CPU)
QUANT_MODES = ("none", "int8-dynamic", "int8-static", "fp8", "int8-weight", "int4-weight")
QUANT_ALIASES = {"int8": "int8-dynamic"}
# ``export_bundle(fallback=...)``: the int8 CPU modes' per-layer float fallback, chosen by measured
# sensitivity (export/quantize/sensitivity.py), or none; the modes it applies to
FALLBACKS = ("auto", "none")
FALLBACK_MODES = ("int8-dynamic", "int8-weight")
# ``export_bundle(smooth=...)``: SmoothQuant-style scaling of the MLPs before the int8 modes
# (export/quantize/smoothing.py), or none; the modes it applies to
SMOOTHINGS = ("auto", "none")
SMOOTHED_MODES = ("int8-dynamic", "int8-static")
# ``export_bundle(quant_tool=...)``: the quantizer of the QDQ modes (int8-static, fp8): NVIDIA
# ModelOpt's ONNX PTQ, onnxruntime's, or auto (export/quantize/__init__.py: AUTO_TOOL)
QUANT_TOOLS = ("auto", "modelopt", "onnxruntime")
# the QDQ modes ModelOpt's ONNX quantizer can write (the others have onnxruntime's only)
MODELOPT_MODES = ("int8-static", "fp8")
# A graph whose weights pass this many bytes keeps them in ``<graph>.data``. Far under protobuf's
# 2 GiB message limit on purpose: an inline graph is serialised whole in memory (the weights twice
# more while it is written and checked), while external data is written one tensor at a time and
# memory-mapped by onnxruntime (export of a 0.8B-width student: 4.6 -> 2.0 GB peak; issue 13).
# Tensors under EXTERNAL_MIN_TENSOR_BYTES stay inline even then.
EXTERNAL_DATA_THRESHOLD = 256 * 2**20
EXTERNAL_MIN_TENSOR_BYTES = 1024


def resolve_quant_mode(name: str) -> str:
    """A quantization mode or its alias -> the mode recorded in a bundle's manifest."""
    mode = QUANT_ALIASES.get(name, name)
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {name!r}; choose one of {sorted(set(QUANT_MODES) | set(QUANT_ALIASES))}")
    return mode

# Sections the runtime reads, with the type each must have.
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "files": dict,
    "graphs": dict,
    "scale": dict,
    "dimensions": list,
    "image": dict,
    "prompt": dict,
    "tokens": dict,
}
_IMAGE_KEYS = ("size", "patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std")
_TOKEN_KEYS = ("image_token_id", "pad_token_id", "query_token_ids", "score_token_ids")
_CHUNK = 1 << 20


class BundleError(ValueError):
    """A bundle that must not be loaded: malformed, incomplete, tampered or of an unknown version."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (graphs can be many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_link(path: Path, links_within: Path | None) -> None:
    """A symlink is refused (it could point outside the bundle, or hide a directory), except a link
    to a regular file inside ``links_within``: the Hugging Face cache links a snapshot's files to
    the repo's ``blobs/`` (zreward_fast.hub)."""
    if not path.is_symlink():
        return
    if links_within is not None:
        target = path.resolve()
        if target.is_file() and not target.is_symlink() and target.is_relative_to(links_within.resolve()):
            return
    raise BundleError(f"{path}: a symlink inside a bundle; a bundle holds only regular files")


def _bundle_files(bundle_dir: Path, links_within: Path | None = None) -> list[str]:
    """Every regular file under the bundle, as a posix path relative to it, except the manifest
    (symlinks: :func:`_check_link`)."""
    names = []
    for root, dirs, files in os.walk(bundle_dir):
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(root) / name
            if path.is_symlink() and name in dirs:
                raise BundleError(f"{path}: a symlink inside a bundle; a bundle holds only regular files")
            _check_link(path, links_within)
        for name in sorted(files):
            rel = (Path(root) / name).relative_to(bundle_dir).as_posix()
            if rel != MANIFEST_NAME:
                names.append(rel)
    return names


def _copy_hashed(src: Path, dst: Path) -> tuple[str, int]:
    """Copy ``src`` to ``dst`` and return the sha256 and size of the bytes written."""
    h, n = hashlib.sha256(), 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fi, open(dst, "xb") as fo:
        for chunk in iter(lambda: fi.read(_CHUNK), b""):
            h.update(chunk)
            fo.write(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def write_manifest(bundle_dir: str | os.PathLike, manifest_without_files: dict) -> dict:
    """Hash every file of ``bundle_dir`` into ``files`` and write ``manifest.json``; return it.

    Call it last, after every graph, data file and the tokenizer are in place.
    """
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"bundle directory not found: {root}")
    manifest = dict(manifest_without_files)
    manifest.setdefault("format", FORMAT_NAME)
    manifest.setdefault("format_version", FORMAT_VERSION)
    manifest["files"] = {
        name: {"sha256": sha256_file(root / name), "bytes": (root / name).stat().st_size}
        for name in _bundle_files(root)
    }
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def update_manifest(bundle_dir: str | os.PathLike, manifest: dict, new_files: Sequence[str] = ()) -> dict:
    """Rewrite ``manifest.json`` with ``manifest``, its ``files`` kept as they are (the graphs are not
    hashed again: GBs at real sizes), plus entries for ``new_files`` hashed now; return it. For
    what is added after :func:`write_manifest`: the parity report, the model card."""
    root = Path(bundle_dir)
    manifest = dict(manifest, files=dict(manifest["files"]))
    for name in new_files:
        _check_link(root / name, None)
        manifest["files"][name] = {"sha256": sha256_file(root / name), "bytes": (root / name).stat().st_size}
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def load_manifest(bundle_dir: str | os.PathLike) -> dict:
    """Parse and check ``manifest.json`` (format, version, required sections); no file hashing."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"bundle directory not found: {root}")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{path}: manifest.json is missing; not an export bundle")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: malformed manifest.json ({e})") from e
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: malformed manifest.json (top level is {type(manifest).__name__}, not an object)")
    if manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise BundleError(
            f"{path}: unknown format version {version!r}; this runtime reads version {FORMAT_VERSION}"
        )
    for key, typ in _REQUIRED.items():
        if key not in manifest:
            raise BundleError(f"{path}: malformed manifest.json: missing section {key!r}")
        if not isinstance(manifest[key], typ):
            raise BundleError(f"{path}: malformed manifest.json: {key!r} must be a {typ.__name__}")
    for section, keys in (("image", _IMAGE_KEYS), ("tokens", _TOKEN_KEYS)):
        absent = [k for k in keys if k not in manifest[section]]
        if absent:
            raise BundleError(f"{path}: malformed manifest.json: {section!r} lacks {absent}")
    if "format" not in manifest["prompt"]:
        raise BundleError(f"{path}: malformed manifest.json: 'prompt' lacks 'format'")
    for name, entry in manifest["files"].items():
        if not _safe_name(name):
            raise BundleError(f"{path}: file name {name!r} is not a plain relative path inside the bundle")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("bytes"), int)):
            raise BundleError(f"{path}: malformed manifest.json: files[{name!r}] needs 'sha256' and 'bytes'")
    return manifest


def _safe_name(name: str) -> bool:
    p = Path(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name and name != MANIFEST_NAME


def verify_bundle(bundle_dir: str | os.PathLike, copy_to: str | os.PathLike | None = None,
                  links_within: str | os.PathLike | None = None) -> dict:
    """Check a bundle completely and return its manifest, or raise :class:`BundleError`.

    Checks: the manifest (see :func:`load_manifest`); both graphs and ``tokenizer.json`` listed;
    no listed file missing, no file unlisted, no symlink; every file's size and sha256 as listed.
    With ``copy_to`` (an empty, private directory) each file is hashed as it is copied there, so a
    loader that reads the copy runs exactly the bytes that were checked, whatever happens to the
    bundle afterwards. ``links_within``: the hub cache folder of a downloaded bundle, whose files
    may be links into it (:func:`_check_link`).
    """
    root = Path(bundle_dir)
    links = Path(links_within) if links_within is not None else None
    _check_link(root / MANIFEST_NAME, links)
    manifest = load_manifest(root)
    files: dict[str, dict[str, Any]] = manifest["files"]
    graphs = manifest["graphs"]
    for g in GRAPH_NAMES:
        name = graphs.get(g)
        if not isinstance(name, str):
            raise BundleError(f"{root}: manifest.json names no {g} graph (graphs.{g}); the bundle is incomplete")
        if name not in files:
            raise BundleError(f"{root}: {g} graph {name!r} is missing from the manifest's file list")
    if TOKENIZER_NAME not in files:
        raise BundleError(f"{root}: {TOKENIZER_NAME} is missing from the manifest's file list")
    present = set(_bundle_files(root, links))
    for name in files:
        if name not in present:
            raise BundleError(f"{root}: {name} is missing from the bundle directory")
    extra = sorted(present - set(files))
    if extra:
        raise BundleError(f"{root}: files not listed in manifest.json: {extra}; a bundle holds only its listed files")
    for name, entry in files.items():
        path = root / name
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise BundleError(f"{path}: tampered or truncated: {size} bytes, manifest says {entry['bytes']}")
        if copy_to is None:
            digest = sha256_file(path)
        else:
            digest, size = _copy_hashed(path, Path(copy_to) / name)
            if size != entry["bytes"]:
                raise BundleError(f"{path}: changed while it was read: {size} bytes, manifest says {entry['bytes']}")
        if digest != entry["sha256"].lower():
            raise BundleError(f"{path}: tampered: sha256 {digest} does not match the manifest's {entry['sha256']}")
    if copy_to is not None:
        (Path(copy_to) / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest
