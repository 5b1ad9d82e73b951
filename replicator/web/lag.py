"""The replication lag chart of the Manage page: an inline SVG sparkline rendered on the server
(the page needs no charting library).

The samples come from the lag history that staging owns (:mod:`replicator.staging.lag`); the
human forms of numbers are shared with ``status`` (:mod:`replicator.ops.format`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import datetime

from markupsafe import Markup, escape

from replicator.ops.format import human_bytes, human_seconds
from replicator.staging.lag import LagSample


def sparkline_svg(
    samples: Sequence[LagSample],
    *,
    field: str,
    start: datetime,
    end: datetime,
    title: str,
    width: int = 320,
    height: int = 64,
) -> Markup:
    """A small line chart of ``field`` ("lag_seconds" or "lag_bytes") over ``[start, end]``.

    Gaps (no sample for more than five minutes — or three usual sample intervals —, or an
    unmeasured value) break the line, so an
    outage of the daemon is visible as a hole rather than a straight line across it. Colours come
    from SVG attributes (the page's Content-Security-Policy forbids inline styles).
    """
    fmt = human_bytes if field == "lag_bytes" else human_seconds
    pad_top, pad_bottom = 6, 14
    plot_h = height - pad_top - pad_bottom
    span = max((end - start).total_seconds(), 1.0)
    pts = [(s.at, getattr(s, field)) for s in samples if start <= s.at <= end]
    values = [float(v) for _, v in pts if v is not None]
    peak = max(values) if values else 0.0
    top = peak if peak > 0 else 1.0

    def xy(at: datetime, v: float) -> str:
        x = (at - start).total_seconds() / span * width
        y = pad_top + plot_h - (v / top) * plot_h
        return f"{x:.1f},{y:.1f}"

    steps = sorted((b[0] - a[0]).total_seconds() for a, b in itertools.pairwise(pts))
    gap = max(300.0, 3 * steps[len(steps) // 2]) if steps else 300.0
    segments: list[list[str]] = []
    current: list[str] = []
    prev: datetime | None = None
    for at, v in pts:
        if v is None or (prev is not None and (at - prev).total_seconds() > gap):
            if current:
                segments.append(current)
            current = []
        if v is not None:
            current.append(xy(at, float(v)))
        prev = at
    if current:
        segments.append(current)

    parts = [
        f'<svg class="spark" viewBox="0 0 {width} {height}" width="100%" height="{height}" '
        f'role="img" preserveAspectRatio="none" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<line x1="0" y1="{pad_top + plot_h}" x2="{width}" y2="{pad_top + plot_h}" '
        'stroke="#c8ced6" stroke-width="1"/>',
    ]
    for seg in segments:
        if len(seg) == 1:
            x, y = seg[0].split(",")
            parts.append(f'<circle cx="{x}" cy="{y}" r="2" fill="#2563eb"/>')
        else:
            parts.append(
                f'<polyline points="{" ".join(seg)}" fill="none" stroke="#2563eb" '
                'stroke-width="1.5" stroke-linejoin="round" vector-effect="non-scaling-stroke"/>'
            )
    if not values:
        parts.append(
            f'<text x="{width / 2:.0f}" y="{pad_top + plot_h / 2 + 4:.0f}" text-anchor="middle" '
            'font-size="11" fill="#6b7280">no samples yet</text>'
        )
    hours = span / 3600
    parts.append(
        f'<text x="2" y="{height - 2}" font-size="10" fill="#6b7280">'
        f"{escape(f'-{hours:g} h')}</text>"
    )
    parts.append(
        f'<text x="{width - 2}" y="{height - 2}" font-size="10" fill="#6b7280" '
        'text-anchor="end">now</text>'
    )
    parts.append(
        f'<text x="{width - 2}" y="{pad_top + 4}" font-size="10" fill="#6b7280" '
        f'text-anchor="end">peak {escape(fmt(peak if values else None))}</text>'
    )
    parts.append("</svg>")
    return Markup("".join(parts))
