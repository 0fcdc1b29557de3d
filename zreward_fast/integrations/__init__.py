"""Where reward models are used: the reward function of RL trainers (:func:`reward_fn`) and the
client of a running ``zreward-fast serve`` (:class:`HTTPScorer`). See docs/integrations.md."""
from .http_client import HTTPScorer, ServerError
from .reward import RewardFunction, reference_statistics, reward_fn, to_images

__all__ = ["HTTPScorer", "RewardFunction", "ServerError", "reference_statistics", "reward_fn", "to_images"]
