"""The attention tap: on the model calls a method asks for, `F.scaled_dot_product_attention` also hands q, k
and v of the running site to the method (ToCa's and DuCa's attention scores)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..patching import Patches
from .context import Context
from .method import CacheMethod


class AttentionTap:
    """While installed, `F.scaled_dot_product_attention` also hands q, k, v of the running site to a method."""

    def __init__(self, ctx: Context, method: CacheMethod):
        self.ctx, self.method, self.orig = ctx, method, None

    def __enter__(self):
        self.patches = Patches()
        self.orig = self.patches.set(F, "scaled_dot_product_attention", self._sdpa)
        return self

    def __exit__(self, *exc):
        self.patches.restore()

    def _sdpa(self, query, key, value, attn_mask=None, *args, **kwargs):
        out = self.orig(query, key, value, attn_mask, *args, **kwargs)
        site = self.ctx.active
        if site is not None and query.dim() == 4:
            scale = kwargs.get("scale")
            if scale is None:
                scale = query.shape[-1] ** -0.5
            with torch.no_grad(), self.ctx.scoring():
                self.method.on_attention(self.ctx, site, query, key, value, attn_mask, scale)
        return out
