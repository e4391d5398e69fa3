"""How the report and the console write numbers: a dash for a missing one, a fixed format or about three
significant digits, and a mean with its spread over seeds.

Example:
    >>> format_significant(0.005137), format_number(0.9012, ".2f", 100.0)
    ('0.00514', '90.12')
    >>> format_mean({"mean": 0.9012, "std": 0.0035, "n": 3}, ".2f", 100.0)
    '90.12 ± 0.35'
"""

from __future__ import annotations

import math
from typing import Any

MISSING = "—"  # what a table shows for a value that was not measured


def is_number(value: Any) -> bool:
    """True for a finite int or float (not bool, None or NaN)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def format_number(value: Any, spec: str, scale: float = 1.0) -> str:
    """Format ``value * scale`` with ``spec`` (rounded first for an integer spec), or a dash when the value is
    missing or not finite."""
    if not is_number(value):
        return MISSING
    scaled = value * scale
    return format(round(scaled) if spec.endswith("d") else scaled, spec)


def format_significant(value: Any, scale: float = 1.0) -> str:
    """``value * scale`` with about 3 significant digits (0.00514, 0.313, 23.2, 557), or a dash."""
    if not is_number(value):
        return MISSING
    scaled = value * scale
    if scaled == 0 or abs(scaled) >= 100:
        return f"{scaled:,.0f}"
    decimals = 2 - math.floor(math.log10(abs(scaled)))
    return f"{scaled:.{decimals}f}"


def format_mean(stats: dict[str, Any] | None, spec: str, scale: float = 1.0) -> str:
    """``90.12 ± 0.35`` from ``{"mean", "std", "n"}`` (the standard deviation after ±; none for one seed), or
    a dash."""
    if not stats:
        return MISSING
    shown = format(stats["mean"] * scale, spec)
    return shown if stats["std"] is None else f"{shown} ± {format(stats['std'] * scale, spec)}"
