"""Differentiable QP backends for the SVM head (MetaOptNet's Crammer-Singer dual).

Every backend solves the same problem, stated in :mod:`episodic.solvers.base`, and is looked up by
name in :data:`SOLVERS` (``head.params.backend``):

* ``fast`` (:mod:`~episodic.solvers.fast`): accelerated projected gradient exploiting the
  Kronecker structure, with warm start and an implicit conjugate-gradient backward; scales to
  256-way episodes.
* ``qpth`` (:mod:`~episodic.solvers.qpth_backend`): the dense QP as in MetaOptNet (reference).
* ``cvxpylayers`` (:mod:`~episodic.solvers.cvxpylayers_backend`): the CVXPY statement (reference).

qpth and cvxpylayers are imported only when their backend is built.
"""

from episodic.solvers.base import SOLVERS, QPSolver, kkt_residual, project_rows

__all__ = ["SOLVERS", "QPSolver", "kkt_residual", "project_rows"]
