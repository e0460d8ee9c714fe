"""How an error is shown to a person: a number, or `–` for a group with no class (a CIFAR-10-LT
subset capped at 100 images has no many-shot class) and for a value that was never measured.
The console, the search table, table.md and the report all print through `error_text`."""
from __future__ import annotations

import math

EMPTY = "–"  # en dash: an empty many/medium/few group, or nothing measured


def is_empty(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def error_text(v, digits: int = 2) -> str:
    """`12.34`, or EMPTY for None and NaN."""
    return EMPTY if is_empty(v) else f"{v:.{digits}f}"
