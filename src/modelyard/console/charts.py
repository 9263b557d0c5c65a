"""Bar charts as inline SVG, drawn on the server: no script, no style attribute (the CSP
allows neither inline), readable without colour (each bar has a title and the table
beside it holds the numbers)."""

from __future__ import annotations

from markupsafe import Markup, escape

WIDTH = 600
HEIGHT = 140
TOP = 4
BOTTOM = 1


def _short(value: int) -> str:
    for size, suffix in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if value >= size:
            return f"{value / size:.1f}{suffix}"
    return str(value)


def bars(points: list[tuple[str, int]], *, label: str, testid: str) -> Markup:
    """One bar per (day, value), the largest value marked; scales to its container."""
    peak = max((value for _, value in points), default=0)
    plot = HEIGHT - TOP - BOTTOM
    step = WIDTH / max(len(points), 1)
    parts = [f'<svg class="chart" data-testid="{escape(testid)}" viewBox="0 0 {WIDTH} '
             f'{HEIGHT}" role="img" aria-label="{escape(label)}" '
             f'preserveAspectRatio="none"><title>{escape(label)}</title>',
             f'<line class="axis" x1="0" y1="{HEIGHT - BOTTOM}" x2="{WIDTH}" '
             f'y2="{HEIGHT - BOTTOM}" vector-effect="non-scaling-stroke"/>']
    for index, (day, value) in enumerate(points):
        height = 0.0 if peak == 0 else plot * value / peak
        x = index * step + step * 0.15
        parts.append(f'<rect class="bar" x="{x:.1f}" y="{HEIGHT - BOTTOM - height:.1f}" '
                     f'width="{step * 0.7:.1f}" height="{height:.1f}"><title>{escape(day)}: '
                     f'{value}</title></rect>')
    parts.append("</svg>")
    # The labels in HTML beneath, not SVG text: they keep their size however the chart
    # is stretched to its container.
    first, last = (points[0][0], points[-1][0]) if points else ("", "")
    parts.append(f'<p class="chart-axis"><span>{escape(first)}</span>'
                 f'<span>max {_short(peak)}</span><span>{escape(last)}</span></p>')
    return Markup("".join(parts))
