"""Profile: run a model over prompts, keep per-prompt distances and statistics, save and plot them."""

from ..artifact import Profile
from .runner import profile

__all__ = ["Profile", "profile"]
