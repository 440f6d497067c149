"""The one home of the type checks every boundary shares (configs, sampling arguments, pipeline input)."""
from __future__ import annotations

import numbers


def is_whole(value) -> bool:
    """An int (or numpy integer), never a bool: True would otherwise pass as 1."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or float (or numpy scalar of either), never a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
