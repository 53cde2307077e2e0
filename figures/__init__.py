"""Paper figures of depthlens: one theme, generic plot builders, saving, and a registry.

Plot builders (``figures.plots``) take plain data and return a themed ``go.Figure``;
``save_figure`` writes HTML + data JSON always and PNG/PDF/SVG where a Chromium is present;
analysis builders register per results ``analysis`` and ``python -m figures`` rebuilds all.

    >>> from figures import lines, save_figure  # writes into figures/out of the working directory  # doctest: +SKIP
    >>> fig = lines([1, 2, 4], {"base": [0.1, 0.3, 0.6]}, "k", "ASR")  # doctest: +SKIP
    >>> save_figure(fig, "figures/out/asr_vs_k").files  # doctest: +SKIP
"""

from .plots import grouped_bars, heatmap, line_with_band, lines, multi_panel, ranked_bars, small_multiples
from .registry import build_combined_figures, build_figures, load_builders, load_record, register
from .save import SavedFigure, export_session, figure_data, save_figure, save_figures, static_export_unavailable
from .theme import PALETTE, apply_theme, figure_size, set_default

__all__ = [
    "PALETTE",
    "SavedFigure",
    "apply_theme",
    "build_combined_figures",
    "build_figures",
    "export_session",
    "figure_data",
    "figure_size",
    "grouped_bars",
    "heatmap",
    "line_with_band",
    "lines",
    "load_builders",
    "load_record",
    "multi_panel",
    "ranked_bars",
    "register",
    "save_figure",
    "save_figures",
    "set_default",
    "small_multiples",
    "static_export_unavailable",
]
