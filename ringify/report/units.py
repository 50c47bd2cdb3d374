"""Sizes, times, token counts and rates as people read them (``1.5 GiB``, ``3.2 ms``, ``128k``, ``400 TFLOP/s``).

Used by the Markdown and the HTML report alike; anything that is not a number is shown as it is."""

from __future__ import annotations


def _number(n) -> bool:
    return isinstance(n, (int, float)) and not isinstance(n, bool)


def size(n) -> str:
    """Bytes in binary units: ``1.5 GiB``."""
    if not _number(n):
        return str(n)
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def time(s) -> str:
    """Seconds down to nanoseconds: ``3.2 ms``, ``40 us``."""
    if not _number(s):
        return str(s)
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(s) >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"


def tokens(n) -> str:
    """A token count in thousands or millions: ``128k``, ``1.05M``."""
    if not _number(n):
        return str(n)
    n = float(n)
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def rate(n, unit: str) -> str:
    """A rate with a decimal prefix: ``400 TFLOP/s``."""
    if not _number(n):
        return str(n)
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}"
