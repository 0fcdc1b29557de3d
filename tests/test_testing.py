"""zreward_fast.testing: the helpers that build test models."""
from __future__ import annotations

import pytest
import torch

from zreward_fast.testing import OUTLIER_NORMS, add_outlier_channels, tiny_model


def test_add_outlier_channels_scales_those_channels_of_every_projection_input():
    model, _ = tiny_model(seed=0)
    hidden = model.config.text_config.hidden_size
    x = torch.randn(3, hidden)
    layers = model.model.language_model.layers
    before = {(i, n): getattr(layer, n)(x) for i, layer in enumerate(layers) for n in OUTLIER_NORMS}
    channels = add_outlier_channels(model, count=3, gain=25.0, seed=7)
    assert channels == sorted(channels) and len(set(channels)) == 3 and max(channels) < hidden
    assert add_outlier_channels(tiny_model(seed=0)[0], count=3, gain=25.0, seed=7) == channels  # seeded
    others = [c for c in range(hidden) if c not in channels]
    with torch.no_grad():
        for (i, n), b in before.items():
            a = getattr(layers[i], n)(x)
            torch.testing.assert_close(a[:, channels], 25.0 * b[:, channels], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a[:, others], b[:, others])  # the rest untouched
    with pytest.raises(ValueError, match="gain > 1"):
        add_outlier_channels(model, gain=1.0)
    with pytest.raises(ValueError, match="count must be >= 1"):
        add_outlier_channels(model, count=0)


def test_train_briefly_trains_the_decoder_and_score_rows_only():
    from zreward_fast import ZRewardModel
    from zreward_fast.testing import train_briefly

    model, processor = tiny_model(0)
    rm = ZRewardModel(model, processor)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        train_briefly(rm, steps=0)
    visual = {k: v.clone() for k, v in model.model.visual.state_dict().items()}
    rows = rm.lm_head.weight[rm.score_token_ids].clone()
    layer = next(model.model.language_model.layers[0].parameters()).clone()
    out = train_briefly(rm, steps=2, batch=2, lr=1e-3)
    assert not rm.training and set(out) == {"first_loss", "last_loss", "held_out_plcc"}
    assert all(torch.equal(v, model.model.visual.state_dict()[k]) for k, v in visual.items())
    assert not torch.equal(rows, rm.lm_head.weight[rm.score_token_ids])  # written back into the head
    assert not torch.equal(layer, next(model.model.language_model.layers[0].parameters()))
