"""The one exception type users see: a bad value, what was given and what is allowed.

Entry points catch :class:`EpisodicError`, print its message as a single ``error: ...`` line
and exit with status 2, so a typo never ends in a traceback.
"""

from __future__ import annotations


class EpisodicError(ValueError):
    """A user-facing configuration or input error (printed as one line, exit code 2)."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`EpisodicError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise EpisodicError(message)
