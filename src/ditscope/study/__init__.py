"""Study: the redundancy paper's experiments as one command each, each finding stated as a number.

`analysis.py` computes (normalised step axis, correlations, change points, bootstrap CoV), `report.py`
writes the HTML, `runner.py` ties them to profiles (reused when already saved).
"""

from .analysis import change_point, compare, cov_over_prompts, cross_model, log_map
from .runner import study_models, study_prompts, study_variants

__all__ = [
    "change_point",
    "compare",
    "cov_over_prompts",
    "cross_model",
    "log_map",
    "study_models",
    "study_prompts",
    "study_variants",
]
