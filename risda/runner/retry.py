"""Which failed trials Tune retries (--max-failures) and which it does not.

- With --address (a cluster, whose nodes may be preempted or lost), --max-failures defaults to
  CLUSTER_MAX_FAILURES, so that a lost node's trials restore elsewhere from their last
  checkpoint; on an embedded Ray to 0 (`max_failures`).
- A diverged trial is not retried: the same config diverges again (training is deterministic),
  and a retry wastes the cluster. Tune 2.60 retries every failure alike, so the trial says it
  diverged in a last report before it raises (`reporting_divergence`, in the trial) and the
  driver's callback (`NoRetryWhenDiverged`) sets that trial's max_failures to 0 when it sees it.
"""
from __future__ import annotations

import contextlib

from ray import tune

from ..trainer.failures import one_line
from ..trainer.loop import DivergedError
from .datacheck import on_cluster

CLUSTER_MAX_FAILURES = 2
DIVERGED_KEY = "diverged"  # in a trial's last report: the DivergedError's message


def max_failures(given: int | None, address: str | None) -> int:
    """--max-failures, or its default: CLUSTER_MAX_FAILURES on a cluster, 0 on an embedded Ray."""
    if given is not None:
        return given
    return CLUSTER_MAX_FAILURES if on_cluster(address) else 0


@contextlib.contextmanager
def reporting_divergence(facts: dict | None = None):
    """Inside a trial, around the trainer: a DivergedError is reported (DIVERGED_KEY), then raised,
    without the trainer's checkpoint path (the trial's scratch folder, removed when it ends)."""
    try:
        yield
    except DivergedError as e:
        e = e.elsewhere()
        tune.report({DIVERGED_KEY: one_line(e), **(facts or {})})
        raise e from None


class NoRetryWhenDiverged(tune.Callback):
    """On the driver: a trial that reported a divergence fails for good when it raises."""

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get(DIVERGED_KEY):
            trial.max_failures = 0
