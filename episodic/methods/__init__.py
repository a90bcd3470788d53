"""Encoder pairings around the same episode (simclr, moco, byol)."""

from episodic.methods.base import METHODS, Method

__all__ = ["METHODS", "Method"]
