"""The non-finite guard: nothing non-finite is stepped on or checkpointed, and no step waits for the host.

Every step, :meth:`Guard.found_inf` flags (on the device, no host read) a non-finite loss or gradient,
including a failed solve of a head (it returns NaN rather than raising). The optimizer's update is
gated by that flag on the device: the fused SGD/Adam/AdamW kernels and LARS skip the update when it is
set (``optimizer.found_inf``, the mechanism of ``torch.amp.GradScaler``), and momentum encoders do not
move. What happens next depends on ``train.skip_nonfinite``:

* ``false`` (default): the flags of the steps since the last check stay on the device and are read
  every ``train.log_every`` steps and before every checkpoint (:meth:`Guard.check`); a flagged step
  stops the run with one line naming the step, the head and the last good checkpoint;
* ``true``: the flag is read after every step (one host read a step); a flagged step's changes to the
  model's buffers (BatchNorm statistics, queues, banks) are undone, the step is counted, and more than
  ``train.max_skips`` flagged steps in a row stop the run the same way.

Checkpoints are only written when every tensor in them is finite (:func:`episodic.checkpoint.save`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from episodic.errors import EpisodicError

log = logging.getLogger(__name__)


class Guard:
    """Non-finite steps: flagged on the device, gated, then stopped on or skipped (see the module docstring).

    Args:
        model: what trains (its floating buffers are restored after a skipped step).
        device: where the flags live.
        skip: ``train.skip_nonfinite``.
        max_skips: ``train.max_skips``: flagged steps in a row allowed in skip mode.
        window: steps between two checks (``train.log_every``): flags and losses kept on the device.
        describe: the run's context for the stop message (``head='r2d2'``).
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        skip: bool,
        max_skips: int,
        window: int,
        describe: Callable[[], str],
    ) -> None:
        self.model, self.skip, self.max_skips, self.describe = model, skip, max_skips, describe
        self.window = window
        self.flags = torch.zeros(2, window, device=device)  # per step since the last check: [bad, loss]
        self.first_step = 0  # step number of column 0
        self.used = 0  # columns written since the last check
        self.skipped = 0  # steps skipped in total (skip mode)
        self.in_a_row = 0  # flagged steps in a row (skip mode)
        self.one = torch.ones((), device=device)

    def found_inf(self, loss: Tensor, params: Sequence[Tensor]) -> Tensor:
        """``1.0`` when ``loss`` or any gradient of ``params`` is non-finite, else ``0.0`` (device scalar)."""
        bad = (~torch.isfinite(loss.detach())).float().reshape(())
        grads = [p.grad for p in params if p.grad is not None]
        if grads:  # sets bad to 1 if any entry is inf or nan; scales by 1 (the gradients stay as they are)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, bad, self.one)
        return bad

    def snapshot(self) -> list[Tensor] | None:
        """Copies of the model's floating buffers (skip mode only), to undo a flagged step's forward."""
        if not self.skip:
            return None
        return [b.detach().clone() for b in self.model.buffers() if b.is_floating_point()]

    def record(
        self, step: int, loss: Tensor, bad: Tensor, before: list[Tensor] | None, last_good: Callable[[], str]
    ) -> bool:
        """Keep (or, in skip mode, act on) step ``step``'s flag; ``True`` when the step was skipped."""
        if not self.skip:
            if self.used == self.window:  # a check is overdue (a caller that never checks)
                self.check(step - 1, last_good)
            if self.used == 0:
                self.first_step = step
            self.flags[:, self.used].copy_(torch.stack([bad, loss.detach().float().reshape(())]))
            self.used += 1
            return False
        if not bool(bad):  # one host read a step: the price of skipping exactly
            self.in_a_row = 0
            return False
        if before is not None:
            now = [b for b in self.model.buffers() if b.is_floating_point()]
            torch._foreach_copy_(now, before)
        self.skipped += 1
        self.in_a_row += 1
        log.warning(
            "non-finite loss or gradient at step %d (%s): update skipped (train.skip_nonfinite=true)",
            step,
            self.describe(),
        )
        if self.in_a_row > self.max_skips:
            raise EpisodicError(
                f"{self.in_a_row} non-finite steps in a row up to step {step} ({self.describe()}; "
                f"train.max_skips={self.max_skips}); last good checkpoint: {last_good()}; lower "
                "optim.optimizer.lr and resume from it (resume=PATH)"
            )
        return True

    def check(self, step: int, last_good: Callable[[], str]) -> None:
        """At a log or checkpoint boundary (``step``): read the flags kept since the last check and test
        the model's state (a few host reads); stop on the first flagged step or non-finite tensor."""
        if not self.skip and self.used:
            flags = self.flags[:, : self.used].cpu()
            first, self.used = self.first_step, 0
            bad = torch.nonzero(flags[0]).flatten()
            if len(bad):
                i = int(bad[0])
                raise EpisodicError(
                    f"non-finite loss or gradient (loss {float(flags[1, i])}) at step {first + i} "
                    f"({self.describe()}); last good checkpoint: {last_good()}; lower optim.optimizer.lr and "
                    "resume from it (resume=PATH), or set train.skip_nonfinite=true to skip such steps"
                )
        state = [
            (n, t) for n, t in (*self.model.named_parameters(), *self.model.named_buffers()) if t.is_floating_point()
        ]
        if state and not bool(torch.stack([torch.isfinite(t).all() for _, t in state]).all()):
            # a finite loss can still leave overflowed weights or BatchNorm statistics (normalised embeddings)
            name = next(n for n, t in state if not bool(torch.isfinite(t).all()))
            raise EpisodicError(
                f"non-finite {name} by step {step} ({self.describe()}); last good checkpoint: {last_good()}; "
                "lower optim.optimizer.lr and resume from it (resume=PATH)"
            )
