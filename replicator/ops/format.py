"""Human forms of the figures operations show (bytes, seconds, "not measured"), shared by
``status``, the Manage page and its lag chart so they all say the same thing."""

from __future__ import annotations

NO_VALUE = "\u2013"  # shown for "not measured"


def human_bytes(n: float | None) -> str:
    if n is None:
        return NO_VALUE
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(size) < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"  # pragma: no cover - loop always returns


def human_seconds(s: float | None) -> str:
    if s is None:
        return NO_VALUE
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"
