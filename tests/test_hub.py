"""Models and bundles by hub repo id (issue 14, part 3), offline: a cache directory laid out as
huggingface_hub lays it out (``models--owner--name/refs``, ``snapshots/<commit>``), read by the real
``snapshot_download`` under ``HF_HUB_OFFLINE=1`` in a child process (the hub reads its settings at
import)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("huggingface_hub")
pytest.importorskip("onnxruntime")

from zreward_fast.hub import is_repo_id, resolve  # noqa: E402

# Repo ids of repos this test writes into its own hub-layout cache; they name nothing on the hub,
# and the children that load them can neither download nor connect (``_offline_env``).
MODEL_ID, BUNDLE_ID, MISSING_ID = "zr-test-cache/student", "zr-test-cache/bundle", "zr-test-cache/nothing-here"


def _cache_repo(cache: Path, repo_id: str, src: Path, refs: tuple[str, ...] = ("main",)) -> str:
    """Put ``src`` in ``cache`` as one snapshot of model repo ``repo_id``; ``refs`` name it (default
    ``main``). Files go to ``blobs/`` by content hash, linked from the snapshot, as the hub does."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}{sorted(p.name for p in src.rglob('*'))}".encode()).hexdigest()
    snap = repo / "snapshots" / commit
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture(scope="module")
def hub(tiny_sources, tmp_path_factory):
    """The tiny model and bundle, each also as a repo in a local cache laid out as the hub's: the
    tests load them by repo id with HF_HUB_OFFLINE=1, from that cache only (nothing downloads)."""
    root = tiny_sources[0].parent
    cache = tmp_path_factory.mktemp("hub") / "cache"
    commits = {"model": _cache_repo(cache, MODEL_ID, root / "model", ("main", "v1")),
               "bundle": _cache_repo(cache, BUNDLE_ID, root / "bundle")}
    return root, cache, commits


_CHILD = r"""
import json, sys
from PIL import Image
import numpy as np
from zreward_fast import ZRewardModel
from zreward_fast.hub import resolve
from zreward_fast.runtime import Scorer
root, commit, model_id, bundle_id, missing_id = sys.argv[1:6]
img, prompt = Image.fromarray(np.full((32, 32, 3), 90, np.uint8)), "a grey square"
out = {}
for name, rev in (("main", None), ("tag", "v1"), ("commit", commit)):
    rm = ZRewardModel.from_pretrained(model_id, revision=rev, local_files_only=True)
    out[name] = rm.score([img], [prompt])[0]["realism"].mean
out["local"] = ZRewardModel.from_pretrained(root + "/model").score([img], [prompt])[0]["realism"].mean
out["resolved"] = [str(resolve(i, local_files_only=True)) for i in (model_id, bundle_id)]
out["bundle"] = Scorer(bundle_id, local_files_only=True).score([img], [prompt])[0]["realism"].mean
out["bundle_local"] = Scorer(root + "/bundle").score([img], [prompt])[0]["realism"].mean
for missing, rev in ((missing_id, None), (model_id, "v2")):
    try:
        ZRewardModel.from_pretrained(missing, revision=rev, local_files_only=True)
        out[missing + str(rev)] = "loaded"
    except FileNotFoundError as e:
        out[missing + str(rev)] = str(e)
print(json.dumps(out))
"""


# Imported first by every child (sitecustomize): any network connection raises, so a repo id that
# the cache did not satisfy fails the test instead of downloading.
_NO_NETWORK = """
import socket

def _refuse(*args, **kwargs):
    raise ConnectionRefusedError("network access in a test: everything must come from the local cache")

socket.socket.connect = socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
"""


def _offline_env(cache: Path) -> dict:
    guard = cache.parent / "no-network"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(_NO_NETWORK)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / "hf-home"),
               HF_ENDPOINT="http://127.0.0.1:9",  # and a closed port, were offline mode ever bypassed
               PYTHONPATH=os.pathsep.join(filter(None, [str(guard), env.get("PYTHONPATH")])))
    return env


def test_children_cannot_reach_the_network(hub):
    _, cache, _ = hub
    code = "import socket; socket.create_connection(('127.0.0.1', 9))"
    proc = subprocess.run([sys.executable, "-c", code], env=_offline_env(cache), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "network access in a test" in proc.stderr, proc.stderr[-1000:]


def test_models_and_bundles_load_by_repo_id_and_revision_offline(hub):
    """Loads by repo id resolve from the test's own hub cache (the ids name nothing on the hub):
    the children run with HF_HUB_OFFLINE=1, local_files_only=True, a closed HF_ENDPOINT and every
    connection refused, so nothing can download."""
    root, cache, commits = hub
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(root), commits["model"], MODEL_ID, BUNDLE_ID, MISSING_ID],
                          env=_offline_env(cache),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["main"] == out["tag"] == out["commit"] == out["local"]
    assert out["bundle"] == out["bundle_local"]
    # both ids resolved to snapshots of the test's own cache, nowhere else
    assert out["resolved"] == [str(cache / f"models--{i.replace('/', '--')}" / "snapshots" / commits[k])
                               for i, k in ((MODEL_ID, "model"), (BUNDLE_ID, "bundle"))]
    missing = out[MISSING_ID + "None"]
    assert "not in the hub cache" in missing or "neither a local directory" in missing
    assert f"{MODEL_ID}@v2" in out[MODEL_ID + "v2"]


def test_cli_commands_take_repo_ids(hub, tmp_path):
    """The CLI's loads by repo id (--local-files-only) resolve from the test's cache, under
    HF_HUB_OFFLINE=1 with every connection refused: nothing can download."""
    root, cache, _ = hub
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "red.png")
    env = _offline_env(cache)
    cli = [sys.executable, "-m", "zreward_fast.cli"]
    args = ["--image", str(tmp_path / "red.png"), "--prompt", "a red square", "--json", "--local-files-only"]
    by_id = subprocess.run(cli + ["score", "--bundle", BUNDLE_ID, *args], env=env, capture_output=True,
                           text=True, timeout=300)
    local = subprocess.run(cli + ["score", "--bundle", str(root / "bundle"), *args], env=env, capture_output=True,
                           text=True, timeout=300)
    assert by_id.returncode == 0, by_id.stderr[-2000:]
    assert json.loads(by_id.stdout) == json.loads(local.stdout)
    model = subprocess.run(cli + ["score", "--model", MODEL_ID, "--revision", "v1", *args], env=env,
                           capture_output=True, text=True, timeout=300)
    assert model.returncode == 0, model.stderr[-2000:]
    assert set(json.loads(model.stdout)["scores"]) == {"alignment", "realism", "aesthetics", "plausibility"}


def test_local_paths_win_and_bad_names_are_clear(tmp_path):
    d = tmp_path / "acme" / "zr"
    d.mkdir(parents=True)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert resolve("acme/zr") == Path("acme/zr")  # an existing directory is never fetched
        with pytest.raises(ValueError, match="pins a hub repo"):
            resolve("acme/zr", revision="main")
    finally:
        os.chdir(cwd)
    with pytest.raises(FileNotFoundError, match="not found: not a local path, and not a hub repo id"):
        resolve(tmp_path / "no" / "such" / "dir")
    assert is_repo_id(MODEL_ID) and not is_repo_id("../x") and not is_repo_id("a/b/c")
    shutil.rmtree(d)


def test_a_cached_bundle_may_link_into_its_blobs_and_nowhere_else(hub, tmp_path):
    from zreward_fast.hub import cache_repo_dir
    from zreward_fast.runtime.bundle import BundleError, verify_bundle

    root, cache, commits = hub
    snap = cache / f"models--{BUNDLE_ID.replace('/', '--')}" / "snapshots" / commits["bundle"]
    assert verify_bundle(snap, links_within=cache_repo_dir(snap))["files"]
    with pytest.raises(BundleError, match="symlink"):
        verify_bundle(snap)  # outside the hub cache a link is refused as before
    copy = tmp_path / "models--evil--b" / "snapshots" / "0"
    shutil.copytree(snap, copy, symlinks=False)
    outside = tmp_path / "tokenizer.json"
    shutil.copy(copy / "tokenizer.json", outside)
    (copy / "tokenizer.json").unlink()
    os.symlink(outside, copy / "tokenizer.json")  # same bytes, but a link out of the repo's cache
    with pytest.raises(BundleError, match="symlink"):
        verify_bundle(copy, links_within=cache_repo_dir(copy))


class _RecordingApi:
    """Stands in for ``HfApi`` (no network here): records what push_to_hub asks of the hub."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw["repo_id"], kw))
        return type("CommitInfo", (), {"commit_url": f"https://hub.example/{kw['repo_id']}/commit/1"})()


def test_push_verifies_a_bundle_before_any_upload(hub, tmp_path):
    from zreward_fast.hub import push_to_hub
    from zreward_fast.runtime.bundle import BundleError

    root, _, _ = hub
    api = _RecordingApi()
    url = push_to_hub(root / "bundle", "acme/zr-bundle", revision="v2", private=True, api=api)
    assert url == "https://hub.example/acme/zr-bundle/commit/1"
    assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    up = api.calls[-1][2]
    assert up["folder_path"] == str(root / "bundle") and up["revision"] == "v2" and "bundle" in up["commit_message"]
    assert push_to_hub(root / "model", "acme/zr-student", api=_RecordingApi()).endswith("/commit/1")
    tampered = tmp_path / "bundle"
    shutil.copytree(root / "bundle", tampered)
    with (tampered / "tokenizer.json").open("a") as f:
        f.write(" ")
    api = _RecordingApi()
    with pytest.raises(BundleError, match="tampered"):
        push_to_hub(tampered, "acme/zr-bundle", api=api)
    assert api.calls == []  # nothing was sent
    with pytest.raises(ValueError, match="owner/name"):
        push_to_hub(root / "bundle", "no-owner", api=api)
    with pytest.raises(FileNotFoundError, match="neither a bundle"):
        push_to_hub(tmp_path, "acme/x", api=api)


def test_init_turns_a_base_checkpoint_into_a_reward_model(tmp_path):
    """`zreward-fast init`: a base Qwen3.5 checkpoint (no score tokens) -> a model directory that
    loads and scores, its new rows initialised from the text they stand for, the base rows kept."""
    import torch
    from transformers import Qwen3_5ForConditionalGeneration

    from zreward_fast import ZRewardModel
    from zreward_fast.cli import main
    from zreward_fast.prompting import CHAT_SPECIAL_TOKENS
    from zreward_fast.testing import tiny_config, tiny_tokenizer

    tok = tiny_tokenizer()
    vocab = tok.get_vocab()
    torch.manual_seed(0)
    base = Qwen3_5ForConditionalGeneration(tiny_config(len(tok), {t: vocab[t] for t in CHAT_SPECIAL_TOKENS}))
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    assert main(["init", "--base", str(tmp_path / "base"), "--out", str(tmp_path / "zr"), "--image-size", "64"]) == 0
    rm = ZRewardModel.from_pretrained(tmp_path / "zr")
    emb = rm.model.get_input_embeddings().weight
    old = base.get_input_embeddings().weight
    assert emb.shape[0] == old.shape[0] + 9 + 4 and torch.equal(emb[: old.shape[0]], old)
    src = tok(" 2.5", add_special_tokens=False)["input_ids"]
    new_id = rm.processor.tokenizer.convert_tokens_to_ids(rm.scale.tokens[5])
    torch.testing.assert_close(emb[new_id], old[src].mean(0))
    assert rm.processor.image_size == 64 and rm.processor.patch_size == base.config.vision_config.patch_size
    out = rm.score([Image.new("RGB", (50, 70), (10, 200, 30))], ["a green square"])
    assert set(out[0]) == {"alignment", "realism", "aesthetics", "plausibility"}
    assert abs(sum(out[0]["realism"].probs) - 1) < 1e-5
    assert main(["init", "--base", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    # the README's path from a base checkpoint to an RL reward: init, then reward_fn on the result
    from zreward_fast.integrations import reward_fn

    scores, info = reward_fn(tmp_path / "zr", risk=0.5)(torch.rand(2, 3, 48, 40), ["a cat", "a dog"])
    assert scores.shape == (2,) and torch.isfinite(scores).all() and info["realism_std"].shape == (2,)
