"""Where reward models are used: the reward function of RL trainers (:func:`reward_fn`) and the
client of a running ``zreward-fast serve`` (:class:`HTTPScorer`). See docs/integrations.md."""
from .http_client import HTTPScorer, ServerError
from .reward import RewardFunction, reward_fn, to_images

__all__ = ["HTTPScorer", "RewardFunction", "ServerError", "reward_fn", "to_images"]
