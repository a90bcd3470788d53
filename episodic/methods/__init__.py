"""Encoder pairings around the same episode (simclr, moco, byol): which encoder embeds what."""

from episodic.methods.base import METHODS, Method

__all__ = ["METHODS", "Method"]
