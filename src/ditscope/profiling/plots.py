"""The profile figures live in `ditscope.plots` (beside the profile file format); this name stays for code that
imports them from here."""

from ..plots import *  # noqa: F403
from ..plots import geometric_band, heatmap_figure, layers_figure, plot_profile, step_ticks  # noqa: F401
