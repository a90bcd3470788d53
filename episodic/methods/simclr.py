"""``simclr``: one encoder embeds support and query views in a single forward pass.

``Head.transform_embeddings`` (identity unless a variant standardises embeddings) sees that one
pass's output; BatchNorm statistics cover every view.
"""

from __future__ import annotations

from episodic.methods.base import METHODS, Embeddings, Method
from episodic.tasks.episode import Episode


@METHODS.register("simclr")
class SimCLR(Method):
    """Support and query share the encoder; BatchNorm statistics cover every view."""

    def embed(self, episode: Episode, transform: Embeddings) -> list[Episode]:
        return [episode.embed(lambda x: transform(self.encoder(x)))]
