"""`uniform`: one width multiplier for every group (the baseline every method must beat)."""

from __future__ import annotations

from .base import Method, Proposal, SearchContext


class Uniform(Method):
    name = "uniform"
    summary = "one width multiplier for every group, bisected to the target; first channels kept"
    cost = "no search: only the fine-tuning"
    trains = False
    defaults: dict = {}

    def search(self, ctx: SearchContext) -> Proposal:
        plan = ctx.land_widths({})
        return Proposal(plan, ctx.model.state_dict(), {"multiplier_widths": plan.widths})
