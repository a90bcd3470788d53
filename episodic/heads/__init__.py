"""Heads: turn an episode's support embeddings into a classifier and score its queries.

Each head lives in its own module and registers itself in :data:`HEADS`; build one with
``HEADS.build(name, **params)``.
"""

from episodic.heads.base import HEADS, Head, HeadOutput, episode_cross_entropy

__all__ = ["HEADS", "Head", "HeadOutput", "episode_cross_entropy"]
