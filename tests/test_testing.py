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
