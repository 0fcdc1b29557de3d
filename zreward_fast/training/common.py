"""What the trainers share: their config base, configs from files, the deterministic batch schedule,
checkpoints."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator, TypeVar

import torch

from ..fileio import atomic_write_text, fsync_tree, replace_directory

logger = logging.getLogger("zreward_fast.training")

C = TypeVar("C")


def load_config(cls: type[C], path: str | os.PathLike, **overrides: Any) -> C:
    """A config dataclass from a YAML or JSON file; unknown keys are an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(text) or {}
    else:
        raw = json.loads(text)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config is a mapping of fields")
    raw.update(overrides)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"{path}: unknown {cls.__name__} fields {unknown}; known: {sorted(fields)}")
    return cls(**raw)


@dataclasses.dataclass
class TrainConfig:
    """What every trainer's config holds: the optimiser (AdamW), its schedule, the step count, the
    clipping, the seed and accelerate's precision. Each trainer's config adds its own fields."""

    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    lr_scheduler_type: str = "constant"  # any transformers.get_scheduler name: "cosine", "linear", ...
    warmup_ratio: float = 0.0  # of max_steps
    max_steps: int = 200
    grad_clip: float = 1.0
    train_vision: bool = False
    seed: int = 0
    mixed_precision: str = "no"  # accelerate: "no", "bf16", "fp16"

    @classmethod
    def from_file(cls: type[C], path: str | os.PathLike, **overrides: Any) -> C:
        """The config from a YAML or JSON file (:func:`load_config`), ``overrides`` applied."""
        return load_config(cls, path, **overrides)


class BatchSchedule:
    """Which records make up global step ``s``: a fresh seeded permutation each epoch.

    A pure function of (seed, step), so a resumed run sees exactly the batches the uninterrupted
    run would have, with no sampler state to save. Each process takes its slice of the batch.
    """

    def __init__(self, num_records: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if num_records <= 0:
            raise ValueError("no training records")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.n, self.batch_size, self.seed, self.rank, self.world = num_records, batch_size, seed, rank, world
        self.per_epoch = max(1, num_records // batch_size)

    def indices(self, step: int) -> list[int]:
        epoch, i = divmod(step, self.per_epoch)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        batch = [perm[(i * self.batch_size + k) % self.n] for k in range(self.batch_size)]
        return batch[self.rank :: self.world]


STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint


@dataclasses.dataclass
class TrainState:
    step: int = 0
    skipped_batches: int = 0
    history: list[dict] = dataclasses.field(default_factory=list)

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> "TrainState":
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path} is truncated or corrupt, not a trainer state ({e}): "
                             "resume from another checkpoint") from None


def grads_finite(params: Iterator[torch.nn.Parameter]) -> bool:
    flags = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
    return bool(torch.stack(flags).all()) if flags else True


def is_finite(x: torch.Tensor | float) -> bool:
    return bool(torch.isfinite(x).all()) if isinstance(x, torch.Tensor) else math.isfinite(x)


class TrainerBase:
    """The loop both trainers share: accelerate, NaN-guarded steps, checkpoints, progress.

    Subclasses set ``self.module`` (the prepared trainable module), ``self.optimizer`` and
    ``self.train_records`` and implement :meth:`compute_loss`.
    """

    name = "train"

    def _setup_accelerator(self, config: TrainConfig, accelerator: Any | None) -> None:
        """Keep ``config``, take its step count and clipping, seed every generator and make (or
        take) the accelerator; a fresh training state."""
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config = config
        self.max_steps, self.grad_clip = config.max_steps, config.grad_clip
        self.accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
        set_seed(config.seed)
        self.state = TrainState()

    def _prepare(self, module: torch.nn.Module, config: Any, batch_size: int) -> None:
        """AdamW over ``module``'s trainable parameters with ``config``'s learning-rate schedule
        (transformers' ``get_scheduler``: warmup over ``warmup_ratio`` of ``max_steps``, then
        ``lr_scheduler_type``), prepared by accelerate, and this process's slice of the
        deterministic batch schedule over ``self.train_records``."""
        from transformers import get_scheduler

        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        if not 0.0 <= config.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {config.warmup_ratio}")
        scheduler = get_scheduler(config.lr_scheduler_type, optimizer,
                                  num_warmup_steps=int(config.warmup_ratio * self.max_steps),
                                  num_training_steps=self.max_steps)
        # not through prepare: accelerate would step it once per process (for per-process step counts);
        # max_steps counts global steps here. Registered so checkpoints carry it.
        self.module, self.optimizer = self.accelerator.prepare(module, optimizer)
        self.lr_scheduler = scheduler
        self.accelerator.register_for_checkpointing(scheduler)
        acc = self.accelerator
        self.schedule = BatchSchedule(len(self.train_records), batch_size, config.seed, acc.process_index,
                                      acc.num_processes)

    def compute_loss(self, records: list) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def check_records(self, records: list) -> str | None:
        """Why a batch must not be trained on (NaN inputs), or None."""
        return None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def training_step(self, records: list) -> float | None:
        """One optimizer step; returns the loss, or None when the batch was skipped (NaN)."""
        self.module.train()
        step = self.state.step
        # every skip decision is collective: ranks that disagreed would fall out of step in the
        # backward's all-reduce and hang (issue 12)
        why = self._any_rank(self.check_records(records))
        if why:
            return self._skip(step, *why)
        loss, logs = self.compute_loss(records)
        why = self._any_rank(None if is_finite(loss) else f"loss is {loss.item()}")
        if why:
            return self._skip(step, *why)
        self.accelerator.backward(loss)
        params = self.trainable_parameters()
        why = self._any_rank(None if grads_finite(iter(params)) else "gradients contain NaN or inf")
        if why:
            return self._skip(step, *why)
        if self.grad_clip:
            self.accelerator.clip_grad_norm_(params, self.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = float(self.accelerator.reduce(loss.detach(), reduction="mean"))
        self.state.history.append({"step": step, "loss": value, **logs})
        self.state.step += 1
        return value

    def _any_rank(self, why: str | None) -> tuple[str, bool] | None:
        """(reason, whether this rank logs it) when any rank must skip this step, else None: the
        first rank that found a reason logs it, so a skip is logged once."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return (why, True) if why else None
        import torch.distributed as dist

        first = torch.tensor([acc.process_index if why else acc.num_processes], device=acc.device)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        first_rank = int(first.item())
        if first_rank == acc.num_processes:
            return None
        if acc.process_index == first_rank:
            return f"{why} (rank {first_rank}; every rank skips the step)", True
        return f"rank {first_rank} skipped it", False

    def _skip(self, step: int, why: str, log: bool = True) -> None:
        if log:
            logger.warning("%s step %d: batch skipped, not trained on: %s", self.name, step, why)
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # torch warns when no optimizer step came first: none must, here
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
            self.lr_scheduler.step()  # the schedule follows the step count, skipped steps included
        self.state.skipped_batches += 1
        self.state.history.append({"step": step, "skipped": why})
        self.state.step += 1
        return None

    def train(self, max_steps: int | None = None) -> TrainState:
        from tqdm.auto import tqdm

        end = max_steps if max_steps is not None else self.max_steps
        bar = tqdm(total=end, initial=self.state.step, desc=self.name, disable=not self.accelerator.is_main_process)
        while self.state.step < end:
            records = [self.train_records[i] for i in self.schedule.indices(self.state.step)]
            loss = self.training_step(records)
            bar.update(1)
            if loss is not None:
                bar.set_postfix(loss=f"{loss:.4f}")
            self.after_step()
        bar.close()
        return self.state

    def after_step(self) -> None:
        """Periodic saving and evaluation; subclasses extend."""

    def save_checkpoint(self, directory: str | os.PathLike) -> Path:
        """Model, optimizer and RNG states (accelerate) plus the step: resuming continues exactly.

        Every rank writes into ``.<name>.partial`` beside the destination, the trainer state goes
        in last, and the finished directory replaces the old checkpoint by renames: a crash leaves
        the old checkpoint, the new one, or none (a clear error on load), never a mix."""
        path = Path(directory)
        partial = path.parent / f".{path.name}.partial"
        if self.accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)  # what an interrupted save left
            partial.parent.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(partial))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.state.save(partial / STATE_FILE)
            fsync_tree(partial)
            replace_directory(partial, path)
        self.accelerator.wait_for_everyone()
        return path

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        path = Path(directory)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a complete trainer checkpoint (no {STATE_FILE}: never written, "
                                    "or its save was interrupted)")
        state = TrainState.load(path / STATE_FILE)  # a clear error before any weights are touched
        self.accelerator.load_state(str(path))
        self.state = state


def full_state_dict(accelerator: Any, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the main process: gathered from FSDP2 shards (whatever
    the checkpoint state-dict type), unwrapped from DDP, or as is."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return accelerator.get_state_dict(module)
