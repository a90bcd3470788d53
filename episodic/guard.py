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
        self.flags = torch.zeros(window, device=device)  # per step since the last log: 1 where non-finite
        # per step since the last log: its 0-d loss and its queries' hits (bool), kept as they are (writing
        # them into a buffer, or reducing the hits, would be more kernels a step); reduced once a window, by take()
        self.kept: list[tuple[Tensor, Tensor]] = []
        self.first_step = 0  # step number of row 0
        self.used = 0  # steps kept since the last log
        self.skipped = 0  # steps skipped in total (skip mode)
        self.in_a_row = 0  # flagged steps in a row (skip mode)
        self.one = torch.ones((), device=device)

    def found_inf(self, step: int, loss: Tensor, params: Sequence[Tensor], last_good: Callable[[], str]) -> Tensor:
        """``1.0`` when ``loss`` or any gradient of ``params`` is non-finite, else ``0.0``: a 0-d device tensor,
        step ``step``'s flag in its row (:meth:`record` keeps it)."""
        flag = self.flag(step, last_good)
        # one kernel sets the flag (zeroed with its window) if any entry of the loss or a gradient is inf or
        # nan; it also scales them by 1 in place (the values stay as they are; the loss is only read after)
        checked = [loss.detach().reshape(1), *(p.grad for p in params if p.grad is not None)]
        torch._amp_foreach_non_finite_check_and_unscale_(checked, flag, self.one)
        return flag

    def flag(self, step: int, last_good: Callable[[], str]) -> Tensor:
        """Step ``step``'s flag (a zeroed 0-d view); a full window (nobody logged: a caller of ``train_step``
        alone) is checked and started over first."""
        if self.used == self.window:
            self.check(step - 1, last_good)
            self.take()
        if self.used == 0:
            self.first_step = step
        return self.flags[self.used]

    def snapshot(self) -> list[Tensor] | None:
        """Copies of the model's floating buffers (skip mode only), to undo a flagged step's forward."""
        if not self.skip:
            return None
        return [b.detach().clone() for b in self.model.buffers() if b.is_floating_point()]

    def record(
        self,
        step: int,
        loss: Tensor,
        correct: Tensor,
        bad: Tensor,
        before: list[Tensor] | None,
        last_good: Callable[[], str],
    ) -> bool:
        """Keep step ``step``'s flag, loss and hits (``correct``: bool per query, or an accuracy) on the
        device (and, in skip mode, act on the flag); ``True`` when the step was skipped."""
        flag = self.flag(step, last_good)
        if bad.data_ptr() != flag.data_ptr():  # not found_inf's flag (the fp16 scaler's test)
            flag.copy_(bad.reshape(()))
        self.kept.append((loss.reshape(()), correct))
        self.used += 1
        if not self.skip:
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

    def take(self) -> Tensor:
        """The rows kept since the last call (``[steps, 3]``: flag, loss, accuracy; on the host, one
        read), and start a new window: the loop logs their means."""
        if not self.used:
            return torch.zeros(0, 3)
        dtype = self.flags.dtype
        loss = torch.stack([x for x, _ in self.kept]).to(dtype)
        hits = [c.reshape(-1) for _, c in self.kept]
        if len({h.numel() for h in hits}) == 1:  # the usual case: as many queries every step, one reduction
            acc = torch.stack(hits).mean(1, dtype=dtype)
        else:
            acc = torch.stack([h.mean(dtype=dtype) for h in hits])
        rows = torch.stack([self.flags[: self.used], loss, acc], 1).cpu()
        self.flags.zero_()  # found_inf only ever sets a flag
        self.kept.clear()
        self.used = 0
        return rows

    def check(self, step: int, last_good: Callable[[], str]) -> None:
        """At a log or checkpoint boundary (``step``): read the flags kept since the last log and test
        the model's state (a few host reads); stop on the first flagged step or non-finite tensor."""
        if not self.skip and self.used:
            bad = torch.nonzero(self.flags[: self.used].cpu()).flatten()
            if len(bad):
                i = int(bad[0])
                raise EpisodicError(
                    f"non-finite loss or gradient (loss {float(self.kept[i][0])}) at step {self.first_step + i} "
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
