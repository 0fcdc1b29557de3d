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
    assert "config.json" in capsys.readouterr().err
    assert main(["score", "--bundle", str(tmp_path), "--image", str(good), "--prompt", "x"]) == 2
    assert "manifest" in capsys.readouterr().err
