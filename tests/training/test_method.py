"""The pieces `reproduce` adds around the trainers: teacher cold start, the scalar baseline, the
GDSO ablation switch."""
from __future__ import annotations

import pytest
import torch

from zreward_fast import ZRewardModel
from zreward_fast.testing import tiny_model
from zreward_fast.training import pairs as P
from zreward_fast.training import synthetic as S
from zreward_fast.training.coldstart import ColdStartConfig, ColdStartTrainer, ReasoningRecord
from zreward_fast.training.data import PairRecord
from zreward_fast.training.gdso import GDSOConfig, GDSOTrainer
from zreward_fast.training.scalar import ScalarConfig, ScalarRewardModel, ScalarTrainer


def _reasonings(n: int = 4) -> list[ReasoningRecord]:
    return [ReasoningRecord(s.image, s.prompt, d, s.scene.reasoning(d), s.scores[d])
            for s in S.samples(n, seed=9, size=64) for d in ("realism", "plausibility")]


def test_cold_start_learns_the_reasoning_its_end_and_the_score(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the kernels have their own tests
    rm = ZRewardModel(*tiny_model(0))
    records = _reasonings()
    trainer = ColdStartTrainer(rm, ColdStartConfig(max_steps=40, batch_size=8, learning_rate=3e-3), records)
    first, _ = trainer.compute_loss(records)
    vision = {k: v.clone() for k, v in rm.model.model.visual.state_dict().items()}
    trainer.train()
    # the vision tower is frozen unless asked for (train_vision): the cold start trains the language side
    assert all(torch.equal(v, rm.model.model.visual.state_dict()[k]) for k, v in vision.items())
    last, logs = trainer.compute_loss(records)
    assert float(last.detach()) < 0.5 * float(first.detach())
    assert logs["loss_reasoning"] < 1.5 and logs["loss_score"] < 1.0
    # greedy reasoning after training reproduces a training text and stops at the end of the turn
    from zreward_fast.training.teacher import default_engine, rollouts

    rm.eval()
    engine = default_engine(rm, max_new_tokens=40, do_sample=False)
    r = records[0]
    batch = rollouts(rm, [r.image], [r.prompt], [r.dimension], 1, engine)
    start, n = int(batch.reasoning_start[0]), int(batch.reasoning_len[0])
    text = rm.processor.tokenizer.decode(batch.inputs["input_ids"][0, start : start + n])
    assert n < 40 and text == r.reasoning


def test_cold_start_refuses_unknown_dimensions():
    rm = ZRewardModel(*tiny_model(0))
    bad = [ReasoningRecord(S.make_sample(1, 64).image, "a red circle", "sharpness", "fine.", 4.0)]
    with pytest.raises(ValueError, match="sharpness"):
        ColdStartTrainer(rm, ColdStartConfig(max_steps=1), bad)


def _pairs(n: int = 8) -> list[PairRecord]:
    return [PairRecord(p.prompt, p.dimension, p.images, (p.scores[0][p.dimension], p.scores[1][p.dimension]))
            for p in P.training_pairs(3, n, gaps=(2.0,), size=64)]


def test_scalar_model_learns_its_pairs_and_gives_one_number_per_image(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = ScalarRewardModel(ZRewardModel(*tiny_model(0)))
    pairs = _pairs()
    trainer = ScalarTrainer(model, ScalarConfig(max_steps=30, pairs_per_step=8, learning_rate=1e-3), pairs)
    history = [h for h in trainer.train().history if "loss" in h]
    first, last = history[:5], history[-5:]
    assert sum(h["loss"] for h in last) < 0.5 * sum(h["loss"] for h in first), history
    assert min(h["accuracy"] for h in last) >= 0.75, last
    (scores,) = model.score([pairs[0].images[0]], [pairs[0].prompt])
    assert len({r.mean for r in scores.values()}) == 1 and scores["realism"].probs == ()
    model.save_pretrained(tmp_path / "scalar")
    again = ScalarRewardModel.from_pretrained(tmp_path / "scalar")
    (scores2,) = again.score([pairs[0].images[0]], [pairs[0].prompt])
    assert scores2["alignment"].mean == pytest.approx(scores["alignment"].mean, abs=1e-5)
    with pytest.raises(ValueError, match="different scores"):
        ScalarTrainer(model, ScalarConfig(), [PairRecord("a red circle", "realism", pairs[0].images, (2.0, 2.0))])


def test_gdso_without_the_grpo_term_trains_only_the_score_losses(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rm = ZRewardModel(*tiny_model(0))
    cfg = GDSOConfig(num_rollouts=2, pairs_per_step=1, max_new_tokens=3, grpo_weight=0.0, beta=0.0, max_steps=1)
    trainer = GDSOTrainer(rm, cfg, train_records=_pairs(2))
    loss, logs = trainer.compute_loss(trainer.train_records[:1])
    assert "loss_grpo" not in logs
    assert float(loss) == pytest.approx(logs["loss_pt"] + logs["loss_pw"], rel=1e-5)
    full = GDSOTrainer(ZRewardModel(*tiny_model(0)), GDSOConfig(num_rollouts=2, pairs_per_step=1, max_new_tokens=3,
                                                               beta=0.0, max_steps=1), train_records=_pairs(2))
    assert "loss_grpo" in full.compute_loss(full.train_records[:1])[1]


def test_reasoning_slices_train_the_end_of_turn_of_a_finished_reasoning():
    from zreward_fast.training.teacher import TeacherBatch, reasoning_slices

    ids = torch.tensor([[1, 2, 3, 10, 11, 5, 6], [1, 2, 3, 12, 5, 6, 0]])
    batch = TeacherBatch({"input_ids": ids}, torch.tensor([6, 5]), torch.tensor([3, 3]), torch.tensor([2, 1]),
                         stopped=torch.tensor([True, False]), stop_token_id=99)
    hidden = torch.arange(7.0)[None, :, None].expand(2, 7, 4)  # each position holds its index
    h, tokens, mask = reasoning_slices(hidden, batch)
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert tokens[0].tolist() == [10, 11, 99] and tokens[1, 0] == 12
    assert h[0, :, 0].tolist() == [2.0, 3.0, 4.0]  # position t-1 predicts token t; the last reasoning token predicts the stop
    assert h[1, 0, 0] == 2.0
    batch.stopped = None  # engines that cannot tell: no stop token is trained
    _, tokens, mask = reasoning_slices(hidden, batch)
    assert mask.tolist() == [[1, 1], [1, 0]] and tokens[0].tolist() == [10, 11]


def test_batched_rollouts_decode_as_each_prompt_alone(monkeypatch):
    """Left-padded batches (prompts of different lengths) give the same greedy reasoning as one
    prompt per generate call: padding reaches neither the attention nor the Gated DeltaNet state."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import dataclasses

    from zreward_fast.training.rollouts import left_pad
    from zreward_fast.training.teacher import default_engine, prompt_inputs

    ids, mask = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]]), torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    out = left_pad({"input_ids": ids, "attention_mask": mask}, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [0, 8, 9]] and out["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]

    rm = ZRewardModel(*tiny_model(3)).eval()
    samples = list(S.samples(5, seed=4, size=64))
    dims = ["alignment", "realism", "plausibility", "aesthetics", "realism"]
    inputs, _ = prompt_inputs(rm, [s.image for s in samples], [s.prompt for s in samples], dims)
    assert len(set(inputs["attention_mask"].sum(1).tolist())) > 1  # the prompts differ in length
    engine = default_engine(rm, max_new_tokens=12, do_sample=False)
    one = dataclasses.replace(engine, batch_size=1).generate(rm.model, inputs, 1)
    batched = dataclasses.replace(engine, batch_size=3).generate(rm.model, inputs, 1)
    assert batched == one and len(one) == 5 and len({tuple(r[0]) for r in one}) > 1
    # G samples per prompt come back grouped under their prompt (near-zero temperature: each is greedy)
    cold = dataclasses.replace(engine, batch_size=3, do_sample=True, temperature=1e-4)
    assert cold.generate(rm.model, inputs, 2) == [[r[0], r[0]] for r in one]
