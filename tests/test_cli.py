import json

import numpy as np
import pytest
from PIL import Image

from zreward_fast.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    assert main(["tiny", "--out", str(d), "--seed", "3"]) == 0
    return d


def test_score_json_and_table(model_dir, tmp_path, capsys):
    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(path)
    capsys.readouterr()
    assert main(["score", "--model", str(model_dir), "--image", str(path), "--prompt", "a red circle", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["scores"]) == ["alignment", "realism", "aesthetics", "plausibility"]
    for s in out["scores"].values():
        assert len(s["probs"]) == 9 and abs(sum(s["probs"]) - 1) < 1e-5 and 0 <= s["mean"] <= 4
    assert main(["score", "--model", str(model_dir), "--image", str(path), "--prompt", "a red circle"]) == 0
    table = capsys.readouterr().out
    assert "plausibility" in table and "mean" in table


def test_score_errors(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"definitely not a png")
    assert main(["score", "--model", str(model_dir), "--image", str(bad), "--prompt", "x"]) == 2
    assert "not a readable image" in capsys.readouterr().err
    good = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(good)
    assert main(["score", "--model", str(tmp_path / "none"), "--image", str(good), "--prompt", "x"]) == 2
    assert "none not found" in capsys.readouterr().err  # not a directory, nor a hub repo id
    (tmp_path / "empty").mkdir()
    assert main(["score", "--model", str(tmp_path / "empty"), "--image", str(good), "--prompt", "x"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["score", "--bundle", str(tmp_path), "--image", str(good), "--prompt", "x"]) == 2
    assert "manifest" in capsys.readouterr().err


def test_serve_has_a_flag_for_every_server_setting(monkeypatch, tmp_path):
    """`serve` passes every ServerConfig field it is given (full names and the short aliases) to
    run_server, and nothing it is not given (the config's defaults stay the config's)."""
    import dataclasses

    import zreward_fast.runtime.server as server
    from zreward_fast.runtime.server import ServerConfig

    seen = {}
    monkeypatch.setattr(server, "run_server", lambda bundle, **kw: seen.update(kw, bundle=bundle))
    argv = ["serve", "--bundle", str(tmp_path), "--max-items", "64", "--max-batch", "32", "--max-wait-ms", "2.5",
            "--queue-size", "512", "--timeout-s", "60", "--no-warmup", "--decode-threads", "2"]
    assert main(argv) == 0
    assert seen == {"bundle": str(tmp_path), "host": "127.0.0.1", "port": 8000, "providers": None, "parallel_runs": 1,
                    "backend": "onnxruntime", "precision": "f32", "check_parity": None,
                    "max_items": 64, "max_batch_size": 32, "max_wait_ms": 2.5, "max_queue": 512,
                    "request_timeout_s": 60.0, "warmup": False, "decode_threads": 2}
    runtime_args = ("bundle", "host", "port", "providers", "parallel_runs", "backend", "precision", "check_parity")
    ServerConfig(**{k: v for k, v in seen.items() if k not in runtime_args})
    seen.clear()
    assert main(["serve", "--bundle", str(tmp_path), "--backend", "openvino", "--precision", "bf16",
                 "--no-parity-check"]) == 0
    assert seen["backend"] == "openvino" and seen["precision"] == "bf16" and seen["check_parity"] is False
    # every field has a flag: each one given alone reaches run_server under its own name
    for f in dataclasses.fields(ServerConfig):
        seen.clear()
        flag = "--" + f.name.replace("_", "-")
        value = [] if f.type in (bool, "bool") else ["k" if f.name == "api_key" else "3"]
        assert main(["serve", "--bundle", str(tmp_path), flag, *value]) == 0, f.name
        assert f.name in seen, f.name


def test_serve_api_key_from_a_file_and_a_warning_for_the_flag(monkeypatch, tmp_path, capsys):
    """Issue 12: a key on the command line shows in the process list: the flag warns, and
    --api-key-file (or $ZREWARD_API_KEY, run_server's default) keeps it out of argv."""
    import zreward_fast.runtime.server as server

    seen = {}
    monkeypatch.setattr(server, "run_server", lambda bundle, **kw: seen.update(kw))
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    assert main(["serve", "--bundle", str(tmp_path), "--api-key-file", str(key)]) == 0
    assert seen["api_key"] == "s3cret" and "warning" not in capsys.readouterr().err
    seen.clear()
    assert main(["serve", "--bundle", str(tmp_path), "--api-key", "k"]) == 0
    assert seen["api_key"] == "k" and "process list" in capsys.readouterr().err
    assert main(["serve", "--bundle", str(tmp_path), "--api-key", "k", "--api-key-file", str(key)]) == 2
    assert main(["serve", "--bundle", str(tmp_path), "--api-key-file", str(tmp_path / "absent")]) == 2
    assert "cannot read" in capsys.readouterr().err
