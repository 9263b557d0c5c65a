"""Bar charts as inline SVG, drawn on the server: no script, no style attribute (the CSP
allows neither inline), readable without colour (each bar has a title and the table
beside it holds the numbers)."""

from __future__ import annotations

from markupsafe import Markup, escape

WIDTH = 600
HEIGHT = 160
TOP = 16
BOTTOM = 22


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
             f'y2="{HEIGHT - BOTTOM}"/>']
    for index, (day, value) in enumerate(points):
        height = 0.0 if peak == 0 else plot * value / peak
        x = index * step + step * 0.15
        parts.append(f'<rect class="bar" x="{x:.1f}" y="{HEIGHT - BOTTOM - height:.1f}" '
                     f'width="{step * 0.7:.1f}" height="{height:.1f}"><title>{escape(day)}: '
                     f'{value}</title></rect>')
    if points:
        parts.append(f'<text class="tick" x="0" y="{HEIGHT - 6}">{escape(points[0][0])}</text>')
        parts.append(f'<text class="tick" x="{WIDTH}" y="{HEIGHT - 6}" text-anchor="end">'
                     f'{escape(points[-1][0])}</text>')
    parts.append(f'<text class="tick" x="0" y="11">max {_short(peak)}</text></svg>')
    return Markup("".join(parts))
