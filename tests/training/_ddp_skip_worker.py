"""Run by tests/training/test_distributed.py under torchrun: a RISD trainer whose rank 1 gets a NaN loss at
step 1. Each rank writes its final score rows and history to OUT/rank<r>.pt."""
import sys
from pathlib import Path

import torch

from zreward_fast import ZRewardModel
from zreward_fast.testing import tiny_model
from zreward_fast.training.data import read_manifest
from zreward_fast.training.risd import RISDConfig, RISDTrainer

manifest, out = sys.argv[1], Path(sys.argv[2])
tr = RISDTrainer(ZRewardModel(*tiny_model(0)), RISDConfig(batch_size=4, learning_rate=3e-3, max_steps=3, seed=0),
                 train_records=read_manifest(manifest, "risd"))
rank = tr.accelerator.process_index
real = tr.compute_loss


def compute_loss(records):
    loss, logs = real(records)
    if rank == 1 and tr.state.step == 1:
        loss = loss * float("nan")
    return loss, logs


tr.compute_loss = compute_loss
tr.train()
torch.save({"rows": tr._unwrapped().score_rows.detach().cpu(), "history": tr.state.history}, out / f"rank{rank}.pt")
