"""The one paper theme: a plotly template "depthlens" plus the inch/point/pixel arithmetic.

Every depthlens figure is laid out in CSS pixels at ``PX_PER_IN`` (96, the browser's own
inch), so a figure ``SINGLE_COLUMN_IN`` (3.3 in) wide is 317 px, and fonts given in points
come out at that point size when the PDF/SVG is placed at its natural size in a two-column
paper. PNGs are rendered with ``PNG_SCALE = PRINT_DPI / PX_PER_IN`` so they carry
``PRINT_DPI`` (300) dots per inch at print size. Colours are Okabe–Ito (safe for the common
colour-vision deficiencies), heat maps use cividis (sequential) or ColorBrewer RdBu
(diverging), both colour-blind safe; text is serif and never below 8 pt at print size.

    >>> import plotly.graph_objects as go
    >>> fig = apply_theme(go.Figure(go.Scatter(y=[1, 3, 2])), width="single")
    >>> fig.layout.width                       # 3.3 in at 96 px/in
    317
"""

from __future__ import annotations

import textwrap
from typing import Literal

import plotly.graph_objects as go
import plotly.io as pio

# --- Units: the only place inches, points and pixels are related. -----------------------
PX_PER_IN = 96
"""CSS pixels per inch: the unit plotly lays out in (HTML and, via Chromium, PDF/SVG)."""
PRINT_DPI = 300
"""Dots per inch of the PNGs at print size."""
PNG_SCALE = PRINT_DPI / PX_PER_IN
"""kaleido ``scale`` for PNG export (3.125), giving ``PRINT_DPI`` at print size."""

SINGLE_COLUMN_IN = 3.3
DOUBLE_COLUMN_IN = 6.9
DEFAULT_HEIGHT_IN = {"single": 2.4, "double": 2.8}

FONT_FAMILY = "Times New Roman, Liberation Serif, Times, DejaVu Serif, serif"
BASE_PT = 9  # axis titles, body text
SMALL_PT = 8  # ticks, legend, colour bar, cell annotations: the floor
TITLE_PT = 10
TITLE_EM_PER_CHAR = 0.44
"""Mean advance of a title character in em, measured on the serif face (≈ 0.41) plus a margin."""

Width = Literal["single", "double"]


def pt(points: float) -> float:
    """Plotly font size (CSS px) for ``points`` at print size."""
    return points * PX_PER_IN / 72


def inches(value_in: float) -> int:
    """Layout pixels for a length in inches."""
    return round(value_in * PX_PER_IN)


# --- Colours. ---------------------------------------------------------------------------
OKABE_ITO = {
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "bluish_green": "#009E73",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "reddish_purple": "#CC79A7",
    "black": "#000000",
    "yellow": "#F0E442",  # last: weak contrast on white
}
PALETTE: list[str] = list(OKABE_ITO.values())
SEQUENTIAL = "cividis"
"""Sequential colour scale (perceptually uniform, designed for colour-vision deficiency)."""
DIVERGING = "RdBu_r"
"""Diverging colour scale (ColorBrewer RdBu, marked colour-blind safe): blue low, red high."""
BAND_ALPHA = 0.2
GRID_COLOUR = "#E5E5E5"


def color(i: int) -> str:
    """The ``i``-th palette colour (cycles)."""
    return PALETTE[i % len(PALETTE)]


def rgba(hex_colour: str, alpha: float) -> str:
    """``#RRGGBB`` to a plotly ``rgba(...)`` string (for translucent interval bands)."""
    h = hex_colour.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


# --- The template. ----------------------------------------------------------------------
def _axis() -> dict:
    return dict(
        showline=True,
        linecolor="black",
        linewidth=0.8,
        mirror=False,
        ticks="outside",
        ticklen=3,
        tickwidth=0.8,
        tickcolor="black",
        tickfont=dict(size=pt(SMALL_PT)),
        title=dict(font=dict(size=pt(BASE_PT)), standoff=4),
        showgrid=True,
        gridcolor=GRID_COLOUR,
        gridwidth=0.5,
        zeroline=False,
        automargin=True,
    )


def _template() -> go.layout.Template:
    colorbar = dict(
        outlinewidth=0,
        thickness=8,
        tickfont=dict(size=pt(SMALL_PT)),
        title=dict(font=dict(size=pt(SMALL_PT)), side="right"),
    )
    layout = go.Layout(
        font=dict(family=FONT_FAMILY, size=pt(BASE_PT), color="black"),
        title=dict(font=dict(size=pt(TITLE_PT)), x=0, xref="paper", xanchor="left",
                   automargin=True, yref="container", y=0.98, yanchor="top"),
        colorway=PALETTE,
        colorscale=dict(sequential=SEQUENTIAL, sequentialminus=SEQUENTIAL, diverging=DIVERGING),
        coloraxis=dict(colorscale=SEQUENTIAL, colorbar=colorbar),
        paper_bgcolor="white",
        plot_bgcolor="white",
        xaxis=_axis(),
        yaxis=_axis(),
        legend=dict(
            font=dict(size=pt(SMALL_PT)),
            orientation="h",
            yanchor="bottom",
            y=1.02,
            xanchor="left",
            x=0,
            bgcolor="rgba(255,255,255,0)",
            itemwidth=30,
            tracegroupgap=0,
        ),
        margin=dict(l=4, r=4, t=4, b=4, pad=0, autoexpand=True),
        hoverlabel=dict(font=dict(family=FONT_FAMILY)),
        bargap=0.2,
        bargroupgap=0.05,
    )
    data = dict(
        heatmap=[go.Heatmap(colorscale=SEQUENTIAL, colorbar=colorbar)],
        scatter=[go.Scatter(line=dict(width=1.5), marker=dict(size=5))],
        bar=[go.Bar(marker=dict(line=dict(width=0)))],
    )
    return go.layout.Template(layout=layout, data=data)


TEMPLATE_NAME = "depthlens"
pio.templates[TEMPLATE_NAME] = _template()


def figure_size(width: Width | float = "single", height_in: float | None = None) -> tuple[int, int]:
    """Pixel ``(width, height)`` for a column width ("single"/"double" or inches) and height."""
    if isinstance(width, str):
        if width not in DEFAULT_HEIGHT_IN:
            raise ValueError(f"width={width!r} is not a column width; use 'single', 'double' or inches.")
        w_in = SINGLE_COLUMN_IN if width == "single" else DOUBLE_COLUMN_IN
        h_in = DEFAULT_HEIGHT_IN[width] if height_in is None else height_in
    else:
        w_in = float(width)
        h_in = w_in * 0.72 if height_in is None else height_in
    return inches(w_in), inches(h_in)


def apply_theme(fig: go.Figure, width: Width | float = "single", height_in: float | None = None) -> go.Figure:
    """Give ``fig`` the depthlens template and a print size; returns the same figure."""
    w, h = figure_size(width, height_in)
    fig.update_layout(template=TEMPLATE_NAME, width=w, height=h, autosize=False)
    return fig


def fit_title(text: str | None, width_px: float) -> str | None:
    """``text`` broken into lines (``<br>``) that fit a figure ``width_px`` wide at the title size.

    Plotly never wraps a title, and a long one runs off the right edge of a static export. A
    character is taken as ``TITLE_EM_PER_CHAR`` em wide; a title that already has line breaks is
    left alone.
    """
    if not text or "<br>" in text:
        return text
    per_line = max(12, int((width_px - 8) / (TITLE_EM_PER_CHAR * pt(TITLE_PT))))
    return "<br>".join(textwrap.wrap(text, per_line, break_long_words=False)) if len(text) > per_line else text


def set_default() -> None:
    """Make "depthlens" plotly's default template for this process (notebooks)."""
    pio.templates.default = TEMPLATE_NAME
