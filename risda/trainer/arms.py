"""The arms, each declared once: its objective, its table label, which stage I it trains and
whether its stage II forks from it, which published methods it may be matched with.

Config validation, `risda.trainer.loop.make_objective`, `risda.trainer.stage1.stage1_key` and the runner's
labels all read `ARMS`. A new arm is one objective class and one entry here.

stage1:
  "ce"   its stage I is plain cross-entropy, shared by every arm that has it (RISDA's protocol:
         the first 80% of the epochs);
  "own"  it trains its own objective from epoch 0 (LDAM, the logit-adjusted loss); that stage I is
         keyed by `stage1_name` and the arm's `stage1_fields`, and shared between cells of the same
         base config that differ only in stage-II fields;
  None   nothing to share (ISDA trains its augmentation from epoch 0).
derived_from: the arm trains exactly that arm's run and differs only in how it is evaluated, so
  the runner trains nothing for it and reads its cell from that arm's cell (post-hoc LA from CE).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from .risda_objective import Parts, RISDAObjective
from .objectives import (DeferredLogitAdjustedObjective, DeferredReweighting, LDAMDRWObjective, LogitAdjustedObjective, Objective,
                         PosthocLogitAdjusted)


@dataclass(frozen=True)
class Arm:
    objective: Callable                 # (cfg, class_counts, feature_dim, device) -> Objective
    label: str                          # its row in tables
    stage1: str | None = "ce"           # "ce", "own" or None (module docstring)
    forks: bool = True                  # its stage II forks from that stage I
    published: tuple[str, ...] = ()     # published methods ([[paper.*]] `method`) it is exactly
    reasons: bool = False               # reads the knowledge graph ε (graph diagnostics, --graph-source)
    has_reference: bool = False         # --variant reference changes it (the authors' code; reads stage-I observations)
    stage1_name: str | None = None      # "own": the objective its stage I trains (shared by same-named arms)
    stage1_fields: tuple[str, ...] = () # "own": Config fields its stage I depends on
    fields: tuple[str, ...] = ()        # Config fields only this arm reads
    fixed: dict = field(default_factory=dict)  # fields the arm pins: it *is* `fixed_as` at these values
    fixed_as: str | None = None
    derived_from: str | None = None     # module docstring
    normed_classifier: bool = False     # a cosine classifier (LDAM's NormedLinear) instead of a linear one


def _risda(reweight, reason_cov, reason_mean):
    return partial(RISDAObjective, parts=Parts(reweight, reason_cov, reason_mean, from_start=False))


ARMS: dict[str, Arm] = {
    "risda": Arm(_risda(True, True, True), "RISDA", reasons=True, has_reference=True, published=("RISDA",)),
    "no_reweight": Arm(_risda(False, True, True), "w/o w (no re-weighting)", reasons=True, has_reference=True,
                       published=("RISDA w/o w (no re-weighting)",)),
    "no_reasoning": Arm(_risda(True, False, False), "w/o r (no reasoning)", has_reference=True,
                        published=("RISDA w/o r (no reasoning)",)),
    "cov_only": Arm(_risda(True, True, False), "covariance only", reasons=True, has_reference=True),
    "isda": Arm(partial(RISDAObjective, parts=Parts(False, False, False, from_start=True)), "ISDA", stage1=None,
                forks=False),
    "ce": Arm(Objective, "CE", published=("CE (ERM, plain cross-entropy)", "CE (plain cross-entropy)")),
    "ce_drw": Arm(DeferredReweighting, "CE-DRW"),
    "ce_posthoc_la": Arm(PosthocLogitAdjusted, "CE + post-hoc LA (τ=1)", derived_from="ce", fields=("la_tau",),
                         published=("Logit adjustment, post-hoc",)),
    "la_loss": Arm(LogitAdjustedObjective, "LA loss (τ=1) = Balanced Softmax", stage1="own", stage1_name="la_loss",
                   stage1_fields=("la_tau",), fields=("la_tau",), published=("Logit-adjusted loss", "Balanced Softmax")),  # the same loss at τ = 1
    "balanced_softmax": Arm(LogitAdjustedObjective, "Balanced Softmax", stage1="own", stage1_name="la_loss",
                            stage1_fields=("la_tau",), fields=("la_tau",), fixed={"la_tau": 1.0}, fixed_as="la_loss",
                            published=("Balanced Softmax",)),
    "la_deferred": Arm(DeferredLogitAdjustedObjective, "CE → LA loss from stage II (deferred; ours)", fields=("la_tau",)),
    "ldam_drw": Arm(LDAMDRWObjective, "LDAM-DRW", stage1="own", stage1_name="ldam", normed_classifier=True,
                    stage1_fields=("ldam_max_margin", "ldam_scale"), fields=("ldam_max_margin", "ldam_scale"),
                    published=("LDAM-DRW",)),
}
# Config fields that only some arms read: outside those arms' own stage I, never part of a stage-I key.
ARM_FIELDS = frozenset(f for arm in ARMS.values() for f in arm.fields)
