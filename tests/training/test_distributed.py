"""Multi-process training on CPU: torchrun with two ranks (gloo), the DDP path of the trainers."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from zreward_fast import ZRewardModel
from zreward_fast.training.data import write_synthetic_dataset


@pytest.mark.slow
def test_risd_ddp_two_ranks_with_torchrun(tmp_path):
    data = write_synthetic_dataset(tmp_path / "data", 8, seed=1, size=64, kinds=("risd",))
    cfg = tmp_path / "risd.json"
    cfg.write_text(json.dumps({"train_manifest": str(data["risd"]), "output_dir": str(tmp_path / "out"),
                               "batch_size": 4, "learning_rate": 0.003, "max_steps": 2}))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # ranks use the torch reference
    res = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29517", "-m", "zreward_fast.cli", "train", "risd",
         "--config", str(cfg)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    # only the main process prints the summary
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["steps"] == 2
    assert res.stdout.count('"steps"') == 1
    rm = ZRewardModel.from_pretrained(summary["saved"])
    assert rm.lm_head.weight.shape[0] == len(rm.processor.tokenizer)


@pytest.mark.slow
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """Issue 12: a rank that skipped alone left the other waiting in the backward's all-reduce (a
    hang). The decision is collective: both ranks skip step 1, log it once, end identical."""
    import torch

    data = write_synthetic_dataset(tmp_path / "data", 8, seed=1, size=64, kinds=("risd",))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    worker = Path(__file__).with_name("_ddp_skip_worker.py")
    res = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29519", str(worker), str(data["risd"]), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["rows"], r1["rows"])
    for r in (r0, r1):
        assert [h["step"] for h in r["history"]] == [0, 1, 2] and "skipped" in r["history"][1]
        assert "loss" in r["history"][0] and "loss" in r["history"][2]
    assert "rank 1" in r0["history"][1]["skipped"] and "loss is nan" in r1["history"][1]["skipped"]
    assert res.stderr.count("batch skipped") == 1, res.stderr[-3000:]
