"""episodic: self-supervised contrastive learning as meta-learning.

Every method is an episode sampler plus a head, trained by one loop: ``python -m episodic.train``
(:mod:`episodic.train`), evaluated by ``python -m episodic.eval``, exported by ``python -m episodic.export``.
The step's data path is :mod:`episodic.model`; configuration schemas are :mod:`episodic.config`.
"""

__version__ = "0.2.0"
