"""``simclr``: one encoder embeds support and query views in a single forward pass.

``head.prepare`` (identity unless a variant standardises embeddings) sees that one pass's output.
"""

from __future__ import annotations

from episodic.heads.base import Head, HeadOutput
from episodic.methods.base import METHODS, Method
from episodic.tasks.episode import Episode


@METHODS.register("simclr")
class SimCLR(Method):
    """Support and query share the encoder; BatchNorm statistics cover every view."""

    def forward(self, episode: Episode, head: Head) -> HeadOutput:
        return head(episode.embed(lambda x: head.prepare(self.encoder(x))))
