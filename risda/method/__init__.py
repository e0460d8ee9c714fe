"""The method: RISDA and the field's long-tail losses, pure torch, no Config and no I/O.

Drop-in modules for any PyTorch training loop (README, "Use RISDA in your own training loop"):
`RISDALoss` (eq. 1-12; ISDA and the paper's ablations are switches of it), `LDAMLoss` with
DRW's weights as an option and its `NormedLinear` classifier, `LogitAdjustedLoss` (= Balanced
Softmax at τ = 1), `posthoc_logit_adjustment`, and `class_balanced_weights` (eq. 12).
"""
from .baselines import LDAMLoss, LogitAdjustedLoss, NormedLinear, log_prior, posthoc_logit_adjustment
from .loss import augmented_logits, class_balanced_weights
from .reference import ReferenceObservations
from .risda_loss import RISDALoss, head_classes

__all__ = ["RISDALoss", "LDAMLoss", "LogitAdjustedLoss", "NormedLinear", "posthoc_logit_adjustment", "log_prior",
           "class_balanced_weights", "augmented_logits", "head_classes", "ReferenceObservations"]
