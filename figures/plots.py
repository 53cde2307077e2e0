"""Generic plot builders for the paper: plain data in (lists, dicts, arrays), themed figure out.

The analysis-specific builders (``figures.builders.*``) turn a results record into calls of
these, so every figure shares the theme, the 95%-interval convention (a shaded band or error
bars, always labelled) and the legend layout. Nothing here knows about models, and nothing
calls ``.show()``.

    >>> fig = line_with_band([0, 1, 2], {"chat": ([1, .5, .2], [.9, .4, .1], [1.1, .6, .3])},  # writes into figures/out of the working directory  # doctest: +SKIP
    ...                      "token position", "KL (nats)")
    >>> save_figure(fig, "figures/out/token_depth_kl")  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .theme import (
    BAND_ALPHA,
    DIVERGING,
    SEQUENTIAL,
    SMALL_PT,
    TITLE_PT,
    Width,
    apply_theme,
    color,
    fit_title,
    pt,
    rgba,
)

Band = tuple[Sequence[float], Sequence[float] | None, Sequence[float] | None]


def _list(values: Any) -> list:
    """A plain list (numpy arrays and tensors included), so figures serialise as lists."""
    if hasattr(values, "tolist"):
        return values.tolist()
    return list(values)


def _finish(fig: go.Figure, title: str | None, xlabel: str | None, ylabel: str | None,
            width: Width | float, height_in: float | None) -> go.Figure:
    apply_theme(fig, width=width, height_in=height_in)
    fig.update_layout(title_text=title)
    if xlabel is not None:
        fig.update_xaxes(title_text=xlabel)
    if ylabel is not None:
        fig.update_yaxes(title_text=ylabel)
    return fig


def _check_len(name: str, n: int, **arrays: Sequence | None) -> None:
    for key, arr in arrays.items():
        if arr is not None and len(arr) != n:
            raise ValueError(f"Series {name!r}: {key} has {len(arr)} values but x has {n}; they must match.")


def _band_traces(x: list, name: str, mean: Sequence, lo: Sequence | None, hi: Sequence | None,
                 colour: str, showlegend: bool = True, mode: str = "lines") -> list[go.Scatter]:
    """Upper bound (invisible), lower bound filled up to it, then the mean line on top."""
    _check_len(name, len(x), mean=mean, lo=lo, hi=hi)
    traces = []
    if lo is not None and hi is not None:
        common = dict(x=x, mode="lines", line=dict(width=0), hoverinfo="skip",
                      legendgroup=name, showlegend=False)
        traces.append(go.Scatter(y=_list(hi), name=f"{name} 95% CI upper", **common))
        traces.append(go.Scatter(y=_list(lo), name=f"{name} 95% CI", fill="tonexty",
                                 fillcolor=rgba(colour, BAND_ALPHA), **common))
    traces.append(go.Scatter(x=x, y=_list(mean), name=name, mode=mode, line=dict(color=colour),
                             marker=dict(color=colour), legendgroup=name, showlegend=showlegend))
    return traces


def _is_band(value: Any) -> bool:
    """True for ``(mean, lo, hi)`` of sequences, False for a plain sequence of numbers."""
    return (isinstance(value, tuple) and len(value) == 3
            and all(v is None or (hasattr(v, "__len__") and not isinstance(v, str)) for v in value))


def line_with_band(
    x: Sequence,
    series: Mapping[str, Band],
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    *,
    width: Width | float = "single",
    height_in: float | None = None,
    markers: bool = False,
    log_y: bool = False,
) -> go.Figure:
    """Lines of means with shaded 95% interval bands: ``series[name] = (mean, lo, hi)``.

    ``lo``/``hi`` may be None for a series without an interval. Per series the figure holds
    (upper, lower-filled, mean) traces; only the mean appears in the legend.
    """
    x = _list(x)
    fig = go.Figure()
    mode = "lines+markers" if markers else "lines"
    for i, (name, (mean, lo, hi)) in enumerate(series.items()):
        fig.add_traces(_band_traces(x, name, mean, lo, hi, color(i), mode=mode))
    fig.update_layout(showlegend=len(series) > 1)
    if log_y:
        fig.update_yaxes(type="log")
    return _finish(fig, title, xlabel, ylabel, width, height_in)


def lines(
    x: Sequence,
    series: Mapping[str, Sequence[float]],
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    *,
    width: Width | float = "single",
    height_in: float | None = None,
    markers: bool = True,
    log_x: bool = False,
    log_y: bool = False,
) -> go.Figure:
    """One line per series over a shared x (e.g. ASR vs k, one line per model)."""
    x = _list(x)
    fig = go.Figure()
    for i, (name, y) in enumerate(series.items()):
        _check_len(name, len(x), y=y)
        fig.add_trace(go.Scatter(x=x, y=_list(y), name=name, mode="lines+markers" if markers else "lines",
                                 line=dict(color=color(i)), marker=dict(color=color(i))))
    fig.update_layout(showlegend=len(series) > 1)
    if log_x:
        fig.update_xaxes(type="log")
    if log_y:
        fig.update_yaxes(type="log")
    return _finish(fig, title, xlabel, ylabel, width, height_in)


def heatmap(
    z: Sequence[Sequence[float]],
    x_labels: Sequence,
    y_labels: Sequence,
    xlabel: str,
    ylabel: str,
    colorbar_title: str,
    zmid: float | None = None,
    text_fmt: str | None = ".2f",
    title: str | None = None,
    *,
    width: Width | float = "single",
    height_in: float | None = None,
    zmin: float | None = None,
    zmax: float | None = None,
    rows_top_down: bool = True,
) -> go.Figure:
    """Heat map with each cell annotated (``text_fmt``, None for no text).

    ``z[i][j]`` is row ``y_labels[i]``, column ``x_labels[j]``; with ``rows_top_down`` row 0
    is on top, as in a table. A ``zmid`` switches to the diverging scale centred there
    (symmetric about it unless ``zmin``/``zmax`` are given); otherwise cividis.
    """
    zl = [[None if (v is None or (isinstance(v, float) and math.isnan(v))) else v for v in _list(row)]
          for row in _list(z)]
    if len(zl) != len(y_labels) or any(len(r) != len(x_labels) for r in zl):
        shape = (len(zl), len(zl[0]) if zl else 0)
        raise ValueError(f"z has shape {shape} but there are {len(y_labels)} y labels and "
                         f"{len(x_labels)} x labels; z must be (len(y_labels), len(x_labels)).")
    kw: dict[str, Any] = dict(colorscale=SEQUENTIAL)
    if zmid is not None:
        finite = [abs(v - zmid) for r in zl for v in r if v is not None]
        span = max(finite) if finite else 1.0
        kw = dict(colorscale=DIVERGING, zmid=zmid,
                  zmin=zmin if zmin is not None else zmid - span,
                  zmax=zmax if zmax is not None else zmid + span)
    else:
        if zmin is not None:
            kw["zmin"] = zmin
        if zmax is not None:
            kw["zmax"] = zmax
    if text_fmt:
        kw.update(texttemplate=f"%{{z:{text_fmt}}}", textfont=dict(size=pt(SMALL_PT)))
    fig = go.Figure(go.Heatmap(z=zl, x=[str(v) for v in x_labels], y=[str(v) for v in y_labels],
                               colorbar=dict(title=dict(text=colorbar_title)), hoverongaps=False, **kw))
    fig.update_xaxes(showgrid=False, type="category", showline=False, ticks="")
    fig.update_yaxes(showgrid=False, type="category", showline=False, ticks="",
                     autorange="reversed" if rows_top_down else True)
    return _finish(fig, title, xlabel, ylabel, width, height_in)


def _colour_limits(values: Sequence[float | None], zmid: float | None) -> dict[str, float]:
    """``cmin``/``cmax`` (and ``cmid``) of one colour axis from its own finite values."""
    finite = [v for v in values if v is not None]
    if zmid is not None:
        span = max((abs(v - zmid) for v in finite), default=0.0) or 1.0
        return dict(cmid=zmid, cmin=zmid - span, cmax=zmid + span)
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    return dict(cmin=lo, cmax=hi if hi > lo else lo + 1.0)


def heatmap_rows(
    rows: Mapping[str, Sequence[float | None]],
    x_labels: Sequence,
    xlabel: str,
    colorbar_title: str,
    zmid: float | None = 0.0,
    title: str | None = None,
    *,
    intervals: Mapping[str, tuple[Sequence[float | None], Sequence[float | None]]] | None = None,
    text_fmt: str | None = None,
    width: Width | float = "double",
    height_in: float | None = None,
) -> go.Figure:
    """One heat-map strip per row, stacked over a shared x, each on its own colour scale.

    Use it where the rows measure different things on different scales (e.g. three kinds of
    perturbation): on one shared scale the row with the largest values leaves the others a
    blank band. ``rows[panel_title] = values over x_labels``; every panel gets its own colour
    axis (``coloraxis``, ``coloraxis2``, …) and colour bar beside it, diverging about ``zmid``
    (symmetric about it, from that row's own largest deviation) or cividis when ``zmid`` is
    None. ``intervals[panel_title] = (lo, hi)`` puts each cell's 95% interval in its hover text.
    """
    if not rows:
        raise ValueError("heatmap_rows needs at least one row; got none.")
    xs = [str(v) for v in x_labels]
    n = len(rows)
    fig = make_subplots(rows=n, cols=1, shared_xaxes=True, subplot_titles=list(rows),
                        vertical_spacing=min(0.12, 0.5 / n))
    for i, (name, values) in enumerate(rows.items()):
        vals = [None if (v is None or (isinstance(v, float) and math.isnan(v))) else float(v) for v in _list(values)]
        if len(vals) != len(xs):
            raise ValueError(f"Row {name!r} has {len(vals)} values but there are {len(xs)} x labels; they must match.")
        axis = "coloraxis" if i == 0 else f"coloraxis{i + 1}"
        kw: dict[str, Any] = {}
        lo, hi = (intervals or {}).get(name, (None, None))
        if lo is not None and hi is not None:
            kw.update(customdata=[[[a, b] for a, b in zip(_list(lo), _list(hi))]],
                      hovertemplate="%{x}: %{z:.3g} [%{customdata[0]:.3g}, %{customdata[1]:.3g}]<extra></extra>")
        if text_fmt:
            kw.update(texttemplate=f"%{{z:{text_fmt}}}", textfont=dict(size=pt(SMALL_PT)))
        fig.add_trace(go.Heatmap(z=[vals], x=xs, y=[name], coloraxis=axis, hoverongaps=False, **kw), row=i + 1, col=1)
        y0, y1 = fig.layout[f"yaxis{i + 1 if i else ''}"].domain
        fig.update_layout({axis: dict(
            colorscale=DIVERGING if zmid is not None else SEQUENTIAL, **_colour_limits(vals, zmid),
            colorbar=dict(title=dict(text=colorbar_title, side="right", font=dict(size=pt(SMALL_PT))),
                          tickfont=dict(size=pt(SMALL_PT)), thickness=8, outlinewidth=0, nticks=4,
                          len=(y1 - y0), y=(y0 + y1) / 2, yanchor="middle", x=1.02, xanchor="left"))})
    fig.update_xaxes(showgrid=False, type="category", showline=False, ticks="")
    fig.update_yaxes(showgrid=False, showticklabels=False, showline=False, ticks="")
    for ann in fig.layout.annotations:  # subplot titles
        ann.font = dict(size=pt(SMALL_PT + 1))
    _finish(fig, title, None, None, width, height_in if height_in is not None else 0.6 + 0.75 * n)
    fig.update_xaxes(title_text=xlabel, row=n, col=1)
    fig.update_layout(margin_t=round(pt(SMALL_PT + 1) * 1.8 + (pt(TITLE_PT) * 1.8 if title else 0)))
    return fig


def _error(values: list[float], lo: Sequence | None, hi: Sequence | None) -> dict | None:
    if lo is None and hi is None:
        return None
    lo_l = _list(lo) if lo is not None else values
    hi_l = _list(hi) if hi is not None else values
    return dict(type="data", symmetric=False, thickness=0.8, width=2, color="black",
                array=[h - v for v, h in zip(values, hi_l)],
                arrayminus=[v - l for v, l in zip(values, lo_l)])


def ranked_bars(
    labels: Sequence[str],
    values: Sequence[float],
    lo: Sequence[float] | None = None,
    hi: Sequence[float] | None = None,
    xlabel: str = "",
    title: str | None = None,
    *,
    top_k: int | None = None,
    descending: bool = True,
    width: Width | float = "single",
    height_in: float | None = None,
) -> go.Figure:
    """Horizontal bars sorted by value (largest on top), with 95% interval error bars.

    The trace holds the bars in ranked order (``trace.y`` the labels, ``trace.x`` the values).
    """
    n = len(labels)
    _check_len("ranked_bars", n, values=values, lo=lo, hi=hi)
    vals = [float(v) for v in _list(values)]
    order = sorted(range(n), key=lambda i: vals[i], reverse=descending)[: top_k or n]
    pick = lambda seq: None if seq is None else [_list(seq)[i] for i in order]  # noqa: E731
    v_sorted = [vals[i] for i in order]
    fig = go.Figure(go.Bar(
        x=v_sorted, y=[str(labels[i]) for i in order], orientation="h", marker_color=color(0),
        error_x=_error(v_sorted, pick(lo), pick(hi)), name=xlabel or "value", showlegend=False,
    ))
    fig.update_yaxes(autorange="reversed", showgrid=False, type="category")
    if height_in is None:
        height_in = max(1.4, 0.5 + 0.16 * len(order))
    fig = _finish(fig, title, xlabel, None, width, height_in)
    # The long layer labels leave a narrow plot, so the title starts at the figure's edge, and a title
    # still too long for the figure goes over lines above the plot (there is no legend to collide with).
    wrapped = fit_title(title, fig.layout.width)
    fig.update_layout(title=dict(text=wrapped, xref="container", pad=dict(l=4, b=4)))
    if wrapped != title:
        fig.update_layout(title=dict(yref="paper", y=1, yanchor="bottom"))
    return fig


def grouped_bars(
    categories: Sequence[str],
    series: Mapping[str, Sequence[float]],
    xlabel: str = "",
    ylabel: str = "",
    title: str | None = None,
    *,
    errors: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    width: Width | float = "single",
    height_in: float | None = None,
) -> go.Figure:
    """Vertical bars, one group per category and one bar per series (e.g. before/after).

    ``errors[name] = (lo, hi)`` adds 95% interval error bars to that series.
    """
    cats = [str(c) for c in categories]
    fig = go.Figure()
    for i, (name, vals) in enumerate(series.items()):
        _check_len(name, len(cats), values=vals)
        v = [float(a) for a in _list(vals)]
        lo, hi = (errors or {}).get(name, (None, None))
        fig.add_trace(go.Bar(x=cats, y=v, name=name, marker_color=color(i), error_y=_error(v, lo, hi)))
    fig.update_layout(barmode="group", showlegend=len(series) > 1)
    fig.update_xaxes(showgrid=False, type="category")
    return _finish(fig, title, xlabel, ylabel, width, height_in)


def small_multiples(
    x: Sequence,
    panels: Mapping[str, Mapping[str, Sequence[float] | Band]],
    xlabel: str,
    ylabel: str | None = None,
    title: str | None = None,
    *,
    cols: int | None = None,
    shared_yaxes: bool = False,
    width: Width | float = "double",
    height_in: float | None = None,
    markers: bool = False,
) -> go.Figure:
    """Panels side by side sharing x; ``panels[panel_title][series] = y or (mean, lo, hi)``.

    A series keeps one colour across panels and appears once in the legend (e.g. one line
    per token position over layers, for three scores side by side).
    """
    if not panels:
        raise ValueError("small_multiples needs at least one panel; got none.")
    x = _list(x)
    n = len(panels)
    cols = cols or min(n, 3)
    rows = math.ceil(n / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=list(panels), shared_yaxes=shared_yaxes,
                        horizontal_spacing=0.08 if shared_yaxes else 0.12, vertical_spacing=0.18)
    colours: dict[str, str] = {}
    seen: set[str] = set()
    mode = "lines+markers" if markers else "lines"
    for p, series in enumerate(panels.values()):
        r, c = divmod(p, cols)
        for name, value in series.items():
            colour = colours.setdefault(name, color(len(colours)))
            mean, lo, hi = value if _is_band(value) else (value, None, None)
            for tr in _band_traces(x, name, mean, lo, hi, colour, showlegend=name not in seen, mode=mode):
                fig.add_trace(tr, row=r + 1, col=c + 1)
            seen.add(name)
    for ann in fig.layout.annotations:  # subplot titles
        ann.font = dict(size=pt(SMALL_PT + 1))
    if height_in is None:
        height_in = 2.2 * rows
    _finish(fig, title, None, None, width, height_in)
    # Legend on the right: above the panels it would collide with the subplot titles.
    # Subplot titles are annotations, which do not push the margin: leave room for them.
    fig.update_layout(showlegend=len(colours) > 1, 
                      margin_t=round(pt(SMALL_PT + 1) * 1.8 + (pt(TITLE_PT) * 1.8 if title else 0)),
                      legend=dict(orientation="v", x=1.01, y=1, xanchor="left", yanchor="top"))
    for p in range(n):
        if p + cols >= n:  # the lowest panel in its column
            r, c = divmod(p, cols)
            fig.update_xaxes(title_text=xlabel, row=r + 1, col=c + 1)
    if ylabel:
        for r in range(1, rows + 1):
            fig.update_yaxes(title_text=ylabel, row=r, col=1)
    return fig


multi_panel = small_multiples
