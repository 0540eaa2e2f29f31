"""Preemption: SIGTERM (what spot/preemptible VMs, Kubernetes and SLURM send before they stop a job) makes
the run save a checkpoint at the next step boundary and exit, so `--resume` continues from it.

Every process of a multi-host run must stop at the same step (the checkpoint is one collective save):

- with `jax.distributed` initialized, JAX's own preemption service (which catches SIGTERM on each
  host and agrees on a step across them; on TPU it also learns of maintenance events) is asked at
  every step boundary: `multihost_utils.reached_preemption_sync_point(step)`, the check orbax's
  `reached_preemption` makes;
- in a single process, a SIGTERM handler sets a flag that the loop reads at the next step boundary.

The previous SIGTERM handler is restored when the run ends.
"""
from __future__ import annotations

import logging
import signal

logger = logging.getLogger("easytune")

EXIT_STATUS = 143  # 128 + SIGTERM: what a terminated job reports, so schedulers requeue it


class Preempted(RuntimeError):
    """The run stopped on a preemption signal after saving its checkpoint."""


class PreemptionWatch:
    """`reached(step)`: whether the run should save and stop after `step` (see the module doc)."""

    def __init__(self):
        import jax
        self._requested = False
        self._installed, self._previous = False, None
        self._sync = None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            self._sync = multihost_utils.reached_preemption_sync_point
            try:
                self._sync(-1)  # the service may be off (jax_enable_preemption_service=False)
            except Exception as e:  # noqa: BLE001 - any failure means: not available
                logger.warning("JAX's preemption service is not available (%s); SIGTERM will not stop this "
                               "multi-process run at a common step.", str(e).splitlines()[0][:200])
                self._sync = None
        else:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._on_signal)
                self._installed = True
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _on_signal(self, signum, frame) -> None:
        if not self._requested:
            logger.warning("SIGTERM received: saving a checkpoint at the end of this step, then stopping.")
        self._requested = True

    def reached(self, step: int) -> bool:
        if self._sync is not None:
            return bool(self._sync(step))
        return self._requested

    def close(self) -> None:
        if self._installed:  # the previous handler; SIG_DFL where it was not set from Python
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed, self._previous = False, None
