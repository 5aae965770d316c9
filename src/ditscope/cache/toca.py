"""ToCa: token-wise feature caching (Zou et al., "Accelerating Diffusion Transformers with Token-wise
Feature Caching", ICLR 2025).

Full steps compute every module and refresh its cache. On the other steps each module (self-attention,
cross-attention, MLP of every block) recomputes only its top-scored tokens: gather them from the
module's input (the block has already applied its norm and modulation), run the module on them,
scatter the result into the cached output. The block then adds `gate * output` for all tokens with the
current step's gate, exactly as without caching.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..errors import DitscopeError
from ..families import CROSS, IMAGE, JOINT, MLP, SELF, TEMPORAL
from ..parallel import agree
from . import scores
from .context import COMPUTE, PARTIAL, REUSE, WHOLE, Context
from .layout import Site
from .method import CacheMethod
from .registry import Knob, register
from .tensors import hidden_arg, with_hidden

SCORES = ("attention", "self_attention", "cross_entropy", "kv_norm", "random")
SCHEDULES = ("pixart", "dit", "fixed")


@dataclass
class ToCaConfig:
    """Token-wise caching. The defaults are the paper's PixArt-alpha setting; `ToCaConfig.dit()` its DiT one.

    Attributes:
        ratio: R0, the base fraction of a module's tokens recomputed on a partial step. The fraction used
            is `ratio * f_step * f_layer * f_module`, clamped to [0, 1].
        interval: N, the full-step interval (the `schedule` bends it over the steps).
        schedule: when full steps happen. "pixart": the interval is round(N / (0.8 + 0.4 step/T)) (4 early,
            2 late for N=3); "dit": round(N / (1.4 - 0.8 step/T)), forced to 2 for steps in [0.2T, 0.4T);
            "fixed": every N steps. A step is full when that many steps have passed since the last full one.
        warmup: the first steps, always full.
        step_weight: w_t, `f_step = 1 + w_t - 2 w_t step/T` (PixArt: 1.9 early down to 0.1 late).
        layer_weight: w_l, `f_layer = 1 + w_l - 2 w_l depth/(L-1)` (PixArt: 1.6 first block, 0.4 last).
        module_factors: f_module per module kind. Self-attention 0: reused on partial steps, as in every
            released setting. A module that cannot run on a token subset (the joint attention of SD3, Flux,
            CogVideoX, Mochi, HunyuanVideo, QwenImage; Wan's self-attention, which applies rotary
            embeddings inside) is computed whole where a factor asks for a subset: `stats()` counts it
            as "whole" and names it in its notes.
        score: how tokens are ranked. "attention": cross-attention entropy (s2) in blocks that have
            cross-attention, self-attention influence (s1) elsewhere; "self_attention" (s1);
            "cross_entropy" (s2); "kv_norm" (value norm; no attention map); "random".
        freq_weight: s3, weight of (steps since the token was last recomputed) / N added to the score.
        uniform_bonus, uniform_grid: s4, in each g x g block of the token grid the top token's score is
            multiplied by (1 + b). b = 0 disables it.
        seed: seed of the "random" score.
    """

    ratio: float = 0.30
    interval: int = 3
    schedule: str = "pixart"
    warmup: int = 1
    step_weight: float = 0.9
    layer_weight: float = 0.6
    module_factors: dict = field(default_factory=lambda: {SELF: 0.0, CROSS: 0.6, MLP: 1.6, TEMPORAL: 0.0})
    score: str = "attention"
    freq_weight: float = 0.25
    uniform_bonus: float = 0.4
    uniform_grid: int = 4
    seed: int = 0

    @classmethod
    def pixart(cls, **overrides) -> ToCaConfig:
        """The paper's PixArt-alpha setting (DPM-Solver++ 20 steps): R0 0.3, N 3, cross x0.6, MLP x1.6."""
        return replace(cls(), **overrides)

    @classmethod
    def dit(cls, **overrides) -> ToCaConfig:
        """The released DiT setting: R0 0.07, N 4, w_t 0.4, w_l 0.8, MLP x2.5, s1 + s3 + s4 (b 0.6, g 2)."""
        base = cls(
            ratio=0.07,
            interval=4,
            schedule="dit",
            step_weight=0.4,
            layer_weight=0.8,
            module_factors={SELF: 0.0, CROSS: 0.0, MLP: 2.5, TEMPORAL: 0.0},
            score="self_attention",
            uniform_bonus=0.6,
            uniform_grid=2,
        )
        return replace(base, **overrides)


class ToCaMethod(CacheMethod):
    uses_modules = True

    def check(self):
        c = self.config
        if c.score not in SCORES:
            raise DitscopeError(f"unknown ToCa score {c.score!r}; choose from {', '.join(SCORES)}")
        if c.schedule not in SCHEDULES:
            raise DitscopeError(f"unknown ToCa schedule {c.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if c.interval < 1 or c.warmup < 0 or not 0 <= c.ratio <= 1:
            raise DitscopeError(
                f"ToCa needs interval >= 1, warmup >= 0 and 0 <= ratio <= 1 (got interval "
                f"{c.interval}, warmup {c.warmup}, ratio {c.ratio})"
            )

    def validate(self, ctx: Context):
        super().validate(ctx)
        c = self.config
        # per block: the site whose attention map scores the block's tokens
        self.score_site: dict[int, int] = {}
        self._tokens_in: dict[int, int] = {}  # site -> its latest input's token count
        for b in ctx.blocks:
            cross = [s for s in b.sites if s.kind == CROSS]
            selfs = [s for s in b.sites if s.kind in (SELF, TEMPORAL)]
            if c.score == "cross_entropy" or (c.score == "attention" and cross):
                chosen = cross
            else:
                chosen = selfs
            if chosen:
                self.score_site[b.index] = chosen[0].index

    # ---------------------------------------------------------------------------------- schedule
    def interval_at(self, step: int, total: int) -> int:
        c, x = self.config, step / total
        if c.schedule == "pixart":
            return max(1, round(c.interval / (0.8 + 0.4 * x)))
        if c.schedule == "dit":
            return 2 if 0.2 <= x < 0.4 else max(1, round(c.interval / (1.4 - 0.8 * x)))
        return c.interval

    def step_kinds(self, total: int) -> list[str]:
        """The kind of each step: full or partial (DuCa adds "reuse")."""
        kinds, last = [], None
        for step in range(total):
            full = step < max(1, self.config.warmup) or step - last >= self.interval_at(step, total)
            kinds.append("full" if full else "partial")
            last = step if full else last
        return kinds

    def step_kind(self, ctx: Context) -> str:
        st = ctx.state
        if st.get("step_kinds_for") != ctx.num_steps:
            st["step_kinds"], st["step_kinds_for"] = self.step_kinds(ctx.num_steps), ctx.num_steps
        return st["step_kinds"][ctx.step]

    def ratio(self, ctx: Context, site: Site) -> float:
        c = self.config
        f_step = 1 + c.step_weight - 2 * c.step_weight * ctx.step / ctx.num_steps
        f_layer = 1 + c.layer_weight - 2 * c.layer_weight * site.depth / max(1, ctx.depths - 1)
        return min(1.0, max(0.0, c.ratio * f_step * f_layer * c.module_factors.get(site.kind, 0.0)))

    # ------------------------------------------------------------------------------------ scores
    def wants_attention(self, ctx: Context) -> bool:
        if self.config.score == "random" or self.step_kind(ctx) != "full":
            return False
        return "partial" in ctx.state["step_kinds"]

    def on_attention(self, ctx: Context, site: Site, q, k, v, mask, scale):
        if self.score_site.get(site.block) != site.index:
            return
        if ctx.sequence_group is not None:
            return self._on_split_attention(ctx, site, q, k, v, mask, scale)
        kind = self.config.score
        if kind == "kv_norm":
            s = scores.value_norm(v)
        elif site.kind == CROSS:
            s = scores.cross_attention_entropy(q, k, mask, scale)
        else:
            s = scores.self_attention_influence(q, k, mask, scale)
        found = ctx.state.setdefault("score", {})
        if q.shape[0] < ctx.rows:  # one attention call per sample (Mochi: each with its own text length)
            parts = found.get(site.block)
            parts = parts if isinstance(parts, list) and parts[0] == ctx.step else [ctx.step]
            found[site.block] = [*parts, *s]
        else:
            found[site.block] = s

    def _on_split_attention(self, ctx: Context, site: Site, q, k, v, mask, scale):
        """Context parallelism: the score's raw sums over every rank's attention sequence, in rank order, the same
        on every rank: added over the ranks' heads when the attention saw the whole sequence with this rank's
        heads (Ulysses), gathered when it saw this rank's tokens only. Ring attention runs the attention once
        per rank's keys and values, this rank's first: only that call is scored."""
        now, seen = (ctx.generation, ctx.step, ctx.call), ctx.state.setdefault("scored_in", {})
        if seen.get(site.index) == now:  # ring attention: the same queries with another rank's keys
            return
        seen[site.index] = now
        kind, cross, group = self.config.score, site.kind == CROSS, ctx.sequence_group
        found = ctx.state.setdefault("score", {})
        if ctx.split == "ulysses+ring" and kind != "kv_norm":
            found[site.block] = None
            ctx.note(
                site.name, "attention split by Ulysses and ring at once: tokens unscored (score=kv_norm is)"
            )
            return
        gathered = q.shape[2] != self._tokens_in.get(site.index) and ctx.split != "ring"
        if (
            gathered and cross and kind != "kv_norm"
        ):  # an entropy of the head-mean map does not add over heads
            found[site.block] = None
            ctx.note(site.name, "cross-attention split over heads: tokens unscored under context parallelism")
            return
        if ctx.split == "ring" and not cross and kind != "kv_norm":  # this rank's queries, its own keys only
            if mask is not None:
                found[site.block] = None
                ctx.note(
                    site.name,
                    "masked self-attention split by ring: tokens unscored under context parallelism",
                )
                return
            # a key's column sum needs every key (the softmax's denominator): this rank's queries against all
            # keys, then the sums added over the ranks' queries
            world = dist.get_world_size(group)
            raw = scores.self_attention_influence(
                q, _gather_tokens(k, group, world, dim=2), None, scale, normalize=False
            )
            found[site.block] = agree(raw, group).float().to(raw.device)
            return
        if kind == "kv_norm":
            raw = scores.value_norm(v, normalize=False)
        elif cross:
            raw = scores.cross_attention_entropy(q, k, mask, scale, normalize=False)
        else:
            raw = scores.self_attention_influence(q, k, mask, scale, normalize=False)
        world = dist.get_world_size(group)
        if gathered:  # this rank's heads: sums over heads (kv-norm) or a head mean (s1) over the group
            raw = agree(raw, group).float().to(raw.device) / (1 if kind == "kv_norm" else world)
        else:  # this rank's tokens: every rank's, in rank order (normalised over them all, text tokens too)
            raw = _gather_tokens(raw.float(), group, world)
        found[site.block] = raw

    def _split_scores(self, ctx: Context, site: Site, rows: int, n: int, device) -> torch.Tensor:
        """Context parallelism: the score of every token of the sequence (rows, n x ranks), in rank order,
        equal on every rank to the one-process score: the raw sums gathered, normalised over all of them."""
        c, st, group = self.config, ctx.state, ctx.sequence_group
        world = dist.get_world_size(group)

        def finish(raw):  # what the one-process score does to the sums
            return F.normalize(raw.sqrt() if c.score == "kv_norm" else raw, dim=-1)

        found = self._found_score(ctx, site)
        if c.score == "random":
            base = scores.random_score(rows, n * world, hash((c.seed, ctx.step, site.index)) % 2**63, device)
        elif found is None or found.shape[0] != rows:
            base = torch.zeros(rows, n * world, device=device)
        else:  # every rank's attention sequence, in rank order: each rank's tokens from its part
            parts = [joint_slice(ctx, site, part, n) for part in finish(found).chunk(world, dim=-1)]
            base = (
                torch.cat(parts, -1)
                if all(p is not None and p.shape[-1] == n for p in parts)
                else torch.zeros(rows, n * world, device=device)
            )
        return self._with_age_and_spread(site, base, _gather_tokens(st["age"][site.index], group, world))

    def _split_choice(self, ctx: Context, site: Site, x, n: int, k: int):
        """A partial step under context parallelism: the top k tokens of the whole sequence, as one process
        picks them. Returns (this rank's token indices, which of them are chosen) or (None, None) when no rank
        has any: each rank runs its chosen tokens padded to the group's largest share (a module with a
        collective inside needs the same count on every rank; a padding token's output is not kept)."""
        group = ctx.sequence_group
        world, me = dist.get_world_size(group), dist.get_rank(group)
        rows = x.shape[0]
        top = self._split_scores(ctx, site, rows, n, x.device).topk(k, dim=1, sorted=False).indices
        chosen_all = torch.zeros(rows, n * world, dtype=torch.bool, device=x.device).scatter_(1, top, True)
        chosen = chosen_all[:, me * n : (me + 1) * n]
        count = torch.tensor([int(chosen.sum(1).max())])
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
        if int(count) == 0:
            return None, None
        idx = (
            chosen.float().topk(int(count), dim=1, sorted=False).indices
        )  # the chosen tokens first, then padding
        return idx, chosen.gather(1, idx)

    def token_scores(self, ctx: Context, site: Site, rows: int, n: int, device) -> torch.Tensor:
        c, st = self.config, ctx.state
        if c.score == "random":
            base = scores.random_score(rows, n, hash((c.seed, ctx.step, site.index)) % 2**63, device)
        else:
            found = self._found_score(ctx, site)
            if isinstance(found, list):  # per-sample scores of differing lengths: slice each, then stack
                # only the stream at the front of the joint order has a known place in every sample's sequence
                first = site.stream == ctx.family.joint_order[0]
                found = [joint_slice(ctx, site, row[None], n) if first else None for row in found[1:]]
                found = (
                    torch.cat(found)
                    if found and all(f is not None and f.shape[-1] == n for f in found)
                    else None
                )
                base = found
            else:
                base = joint_slice(ctx, site, found, n) if found is not None else None
            if base is None or base.shape[0] != rows:
                base = torch.zeros(rows, n, device=device)
        return self._with_age_and_spread(site, base, st["age"][site.index])

    def _found_score(self, ctx: Context, site: Site):
        """The attention score of `site`'s block, noting when none came: the attention never called torch's
        scaled_dot_product_attention, which the score is read from (a diffusers attention backend other than
        native: flash, sage, ...)."""
        found = ctx.state.get("score", {})
        if site.block not in found and self.config.score != "random":
            ctx.note(
                site.name,
                "no attention score came (the attention does not call torch's "
                "scaled_dot_product_attention: use diffusers' native backend): tokens chosen by age alone",
            )
        return found.get(site.block)

    def _with_age_and_spread(self, site: Site, base: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        """s3 (steps since a token was recomputed) added to the attention score, then s4 on an image grid."""
        c = self.config
        score = base + c.freq_weight * age / c.interval
        if site.stream == IMAGE and site.kind != TEMPORAL:
            score = scores.spatial_uniformity(score, c.uniform_grid, c.uniform_bonus)
        return score

    # ----------------------------------------------------------------------------------- modules
    def module(self, ctx: Context, site: Site, run, args, kwargs):
        st = ctx.state
        kind = self.step_kind(ctx)
        cache = st.setdefault("cache", {}).get(site.index)
        x = hidden_arg(args, kwargs, site.hidden)
        n = x.shape[1] if x.dim() >= 3 else 0
        self._tokens_in[site.index] = n  # what this rank's attention scores see (context parallelism)
        if kind == "full" or cache is None:
            return self._compute(ctx, site, run, args, kwargs, n)
        if kind == "reuse":
            return self._reuse(ctx, site, cache, n)
        # under context parallelism this rank holds n of the sequence's tokens: the share is of all of them
        total = n * (dist.get_world_size(ctx.sequence_group) if ctx.sequence_group is not None else 1)
        k = round(self.ratio(ctx, site) * total)
        if k <= 0:
            return self._reuse(ctx, site, cache, n)
        if k >= total:
            return self._compute(ctx, site, run, args, kwargs, n)
        why = whole_only(site) or (None if torch.is_tensor(cache) else "its output is not one tensor")
        if (
            why
        ):  # asked for a token subset it cannot give: compute it whole (quality kept, saving lost) and say so
            ctx.note(site.name, f"token subset asked for, computed whole: {why}")
            return self._compute(ctx, site, run, args, kwargs, n, action=WHOLE)
        keep = None  # one process: every token it runs is a chosen one
        if ctx.sequence_group is not None:
            idx, keep = self._split_choice(ctx, site, x, n, k)
            if idx is None:
                return self._reuse(ctx, site, cache, n)
        else:
            idx = self.token_scores(ctx, site, x.shape[0], n, x.device).topk(k, dim=1, sorted=False).indices
        return self._run_subset(ctx, site, run, args, kwargs, cache, x, idx, keep, n)

    def _run_subset(self, ctx, site, run, args, kwargs, cache, x, idx, keep, n):
        """Run the module on the tokens `idx` (rows, k) and write their outputs into the cache; with `keep`
        (rows, k) only the marked ones (the rest are padding, computed and not kept)."""
        rows, k = idx.shape
        x_sub = torch.gather(x, 1, idx.unsqueeze(-1).expand(rows, k, x.shape[-1]))
        if site.kind in (SELF, TEMPORAL):  # the chosen queries still attend to every token
            kwargs = {**kwargs, site.kv: x}
        sub_args, sub_kwargs = with_hidden(args, kwargs, x_sub, site.hidden)
        out = run(*sub_args, **sub_kwargs).to(cache.dtype)
        where = idx.unsqueeze(-1).expand(rows, k, cache.shape[-1])
        age = ctx.state["age"][site.index]
        age += 1
        if keep is None:
            cache.scatter_(1, where, out)
            age.scatter_(1, idx, 0)
        else:
            cache.scatter_(1, where, torch.where(keep.unsqueeze(-1), out, cache.gather(1, where)))
            age.scatter_(1, idx, torch.where(keep, torch.zeros_like(age.gather(1, idx)), age.gather(1, idx)))
        ctx.count(PARTIAL, k * rows if keep is None else int(keep.sum()), n * rows)
        return cache

    def _compute(self, ctx, site, run, args, kwargs, n, action=COMPUTE):
        out = run(*args, **kwargs)
        st = ctx.state
        # a private copy: partial steps scatter into it in place
        st["cache"][site.index] = out.clone() if torch.is_tensor(out) else out
        x = hidden_arg(args, kwargs, site.hidden)
        st.setdefault("age", {})[site.index] = torch.zeros(x.shape[:2], device=x.device)
        ctx.count(action, n * x.shape[0], n * x.shape[0])
        return out

    def _reuse(self, ctx, site, cache, n):
        age = ctx.state["age"][site.index]
        age += 1
        ctx.count(REUSE, 0, n * age.shape[0])
        return cache


def _gather_tokens(x: torch.Tensor, group, world: int, dim: int = -1) -> torch.Tensor:
    """(rows, n) per rank -> (rows, n x ranks) on every rank, in rank order (`dim`: the token axis)."""
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim)


def whole_only(site: Site) -> str | None:
    """Why a token subset of this module cannot run alone (None: it can)."""
    if site.kind in (SELF, TEMPORAL) and site.stream == JOINT:
        return "joint attention: its queries are the image and text tokens together"
    if not site.tokenwise:
        return "it applies per-token rotary embeddings to the whole sequence inside"
    return None


def joint_slice(ctx: Context, site: Site, score: torch.Tensor, n_tokens: int) -> torch.Tensor | None:
    """The part of a per-token score over an attention sequence that a module's tokens correspond to."""
    if score.shape[-1] == n_tokens:
        return score
    if site.stream == JOINT or score.shape[-1] < n_tokens:
        return None
    image_first = ctx.family.joint_order[0] == "image"
    other = score.shape[-1] - n_tokens
    if (site.stream == "image") == image_first:
        return score[..., :n_tokens]
    return score[..., other:]


register(
    "toca",
    ToCaConfig,
    ToCaMethod,
    "per module (self-attn, cross-attn, MLP): recompute the top-scored tokens, reuse the rest",
    grid=[{"interval": 2, "ratio": 0.3}, {}, {"interval": 4}, {"interval": 5, "ratio": 0.2}],
    compact=[{"interval": 2, "ratio": 0.3}, {}, {"preset": "dit"}],
    knob=Knob("interval", 2, 10, integer=True),  # ratio: --knob ratio
    exact={"interval": 1, "schedule": "fixed"},
    aggressive={},
)
