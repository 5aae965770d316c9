"""What a cache did: per model call, modules computed / reused / partial / predicted, tokens recomputed,
blocks computed / reused, and the FLOPs executed against a full step's."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CacheStats:
    method: str
    records: list[dict]
    sites: list
    notes: dict[str, str] = field(
        default_factory=dict
    )  # unit -> what the method could not do there and did instead

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self.records)

    @property
    def full_flops(self) -> float | None:
        """FLOPs of one uncached step: the first step is always full (its scoring FLOPs taken out)."""
        first = [r for r in self.records if r["step"] == 0]
        if not first or any(r["flops"] is None for r in first):
            return None
        return float(sum(r["flops"] - r["score_flops"] for r in first))

    @property
    def flops(self) -> float | None:
        if not self.records or any(r["flops"] is None for r in self.records):
            return None
        return float(sum(r["flops"] for r in self.records))

    @property
    def steps(self) -> int:
        return len({r["step"] for r in self.records})

    @property
    def flops_ratio(self) -> float | None:
        """Executed FLOPs over those of the same number of full steps (1.0 = no saving)."""
        full, done = self.full_flops, self.flops
        return None if not full or done is None else done / (full * self.steps)

    def summary(self) -> dict:
        keys = (
            "computed",
            "reused",
            "partial",
            "predicted",
            "whole",
            "blocks_computed",
            "blocks_reused",
            "tokens",
            "tokens_total",
        )
        total = {k: sum(r[k] for r in self.records) for k in keys}
        total["rows_forced"] = sum(r.get("rows_forced", 0) for r in self.records)  # adaptive plans
        total["steps"] = self.steps
        total["flops"] = self.flops
        total["flops_ratio"] = self.flops_ratio
        total["speedup_flops"] = 1 / self.flops_ratio if self.flops_ratio else None
        return total

    def __str__(self) -> str:
        if not self.records:
            return f"{self.method}: no model call yet"
        lines = [f"{self.method}: {self.steps} steps, {len(self.records)} model calls"]
        lines.append(" step call  computed reused partial predicted  tokens recomputed  blocks c/r   GFLOPs")
        for r in self.records:
            tok = f"{r['tokens'] / r['tokens_total']:.0%}" if r["tokens_total"] else "-"
            fl = f"{r['flops'] / 1e9:8.3f}" if r["flops"] is not None else "       -"
            lines.append(
                f"{r['step']:5d} {r['call']:4d}  {r['computed']:8d} {r['reused']:6d} {r['partial']:7d} "
                f"{r['predicted']:9d}  {tok:>17}  {r['blocks_computed']:4d}/{r['blocks_reused']:<4d}  {fl}"
            )
        s = self.summary()
        if s["whole"]:
            lines.append(
                f"{s['whole']} partial recomputes ran whole: a token subset of these modules is not exact"
            )
        for unit, text in self.notes.items():
            lines.append(f"  {unit}: {text}")
        if s["flops_ratio"]:
            lines.append(
                f"executed FLOPs {s['flops'] / 1e9:.3f} G = {s['flops_ratio']:.3f} of full "
                f"({s['speedup_flops']:.2f}x fewer)"
            )
        return "\n".join(lines)
