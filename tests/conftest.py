import os

# The Triton interpreter must be chosen before anything imports triton: the kernels then run
# on the CPU in fp32 and the tests compare them with the torch reference.
os.environ.setdefault("TRITON_INTERPRET", "1")
# nothing downloads at run time: models come from configs, hub tests from a local cache layout
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory):
    """A tiny random model saved to a directory and its fp32 bundle: (model_dir, bundle_dir), for
    the tests of what loads and scores them (integrations, bulk scoring, hub)."""
    from zreward_fast import ZRewardModel
    from zreward_fast.export.api import export_bundle
    from zreward_fast.testing import tiny_model

    root = tmp_path_factory.mktemp("tiny-sources")
    rm = ZRewardModel(*tiny_model(seed=3))
    rm.save_pretrained(root / "model")
    export_bundle(rm, root / "bundle", num_pairs=4, progress=False)
    return root / "model", root / "bundle"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run by bench/gpu_check.sh)")
    config.addinivalue_line("markers", "slow: slow on CPU; still run by `make test`")
    config.addinivalue_line("markers", "heavy: minutes each (the method end to end, 9B width): run by "
                                       "`make test-heavy` (ZREWARD_HEAVY=1), CI's second step, not by `make test`")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_heavy = pytest.mark.skip(reason="heavy: run by `make test-heavy` (ZREWARD_HEAVY=1), CI's second step")
    heavy = os.environ.get("ZREWARD_HEAVY") == "1"
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "heavy" in item.keywords and not heavy:
            item.add_marker(skip_heavy)


@pytest.fixture(scope="session")
def trained_student(tmp_path_factory):
    """A slightly trained tiny student (RISD on synthetic ground truth, 400 steps), saved; its
    directory. Untrained random models score all images nearly alike, which makes pairwise
    agreement meaningless: the int8 export and fp8 engine parity tests use this one."""
    from zreward_fast import ZRewardModel
    from zreward_fast.testing import demo_model
    from zreward_fast.training.data import read_manifest, write_synthetic_dataset
    from zreward_fast.training.risd import RISDConfig, RISDTrainer

    tmp = tmp_path_factory.mktemp("student")
    data = write_synthetic_dataset(tmp / "data", 400, seed=5, size=128, kinds=("risd",))
    model = ZRewardModel(*demo_model(seed=0))
    cfg = RISDConfig(batch_size=16, learning_rate=5e-4, max_steps=400, train_vision=True, seed=0)
    trainer = RISDTrainer(model, cfg, train_records=read_manifest(data["risd"], "risd"))
    with pytest.MonkeyPatch.context() as mp:  # the kernels' torch path: the interpreter is a correctness tool
        mp.delenv("TRITON_INTERPRET", raising=False)
        trainer.train()
    trainer.save_pretrained(tmp / "model")
    return tmp / "model"


@pytest.fixture(scope="module")
def tiny():
    """A tiny random Qwen3.5 reward model and its processor (64x64 bucket)."""
    from zreward_fast.testing import tiny_model

    return tiny_model(seed=0)
