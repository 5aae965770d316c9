"""The base of every cache method: what the engine calls on a method, and when."""

from __future__ import annotations

from .context import Context
from .layout import BlockSite, Site
from .registry import check_fields


class CacheMethod:
    """Base of the cache methods. A method overrides `module` and/or `block`.

    What the engine calls, per model call: `before_call` (the context is at the call's step and slot), then
    `block` for each transformer block (`uses_blocks`) and `module` for each cached child module
    (`uses_modules`), `on_attention` while the attention tap is on (`wants_attention`), and `after_call`.
    A method that only watches (calibration, TeaCache's fit: cache/observe.py) computes everything and
    measures in these calls; nothing else installs hooks on the model.
    """

    uses_modules = False
    uses_blocks = False

    def __init__(self, config):
        self.config = config

    def check(self):
        """Raise DitscopeError for options no model can run (an interval below 1, a ratio above 1): what
        `config_from_options` checks before a model loads."""

    def validate(self, ctx: Context):
        """Raise DitscopeError for a config that cannot work on this model (and for what `check` refuses)."""
        check_fields(self.config)
        self.check()

    def wants_attention(self, ctx: Context) -> bool:
        """Whether the attention tap should call `on_attention` during this model call."""
        return False

    def on_attention(self, ctx: Context, site: Site, q, k, v, mask, scale):
        pass

    def before_call(self, ctx: Context):
        """Observer hook: the start of a model call, once `ctx` is at its step, call slot and rows (`ctx.step`,
        `ctx.call`, `ctx.rows`), before the model runs."""

    def after_call(self, ctx: Context, out):
        """Observer hook: the end of a model call (every block and module of it has run; `ctx.state` is still the
        call slot's), with what the model returned. Not called when the model raised."""

    def module(self, ctx: Context, site: Site, run, args: tuple, kwargs: dict):
        return run(*args, **kwargs)

    def block(self, ctx: Context, bsite: BlockSite, run, args: tuple, kwargs: dict):
        return run(*args, **kwargs)

    def default_steps(self) -> int | None:
        """The step count to assume when neither a pipeline's scheduler nor the caller tells it."""
        return None
