"""The interface every search method implements, and what the pipeline hands it.

A method sees coupled channel groups, parameters by channel, data and a training loop; it
never touches fx graphs (ARCHITECTURE.md). It returns a `Proposal`: a keep plan that went
through the shared target step (`ctx.land`), and the weights the slim model inherits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from ..analysis import analyze
from ..errors import UserError
from ..graph import ChannelGraph, TiedSlice
from ..passes.gates import gated
from ..target import Constraint, Plan, land_on_target, scores_from_widths
from ..train import evaluate, steps_per_epoch, train
from ..units import in_interval


@dataclass
class SearchContext:
    graph: ChannelGraph
    model: nn.Module  # a copy of the trained baseline; the method may train it
    data: Any  # graphsearch.data.DataBundle
    constraints: list[Constraint]
    round_to: int
    settings: dict  # the method's hyper-parameters (its defaults, overridden by --set)
    epochs: float  # the search budget, in epochs of the training split
    lr: float
    batch_size: int
    seed: int
    state_dir: Path  # the method checkpoints here (resume)
    progress: bool = True
    log: Callable[[str], None] = print
    latency_model: Callable | None = None
    example_inputs: tuple = ()
    candidates: list[dict] = field(default_factory=list)  # for the trade-off plot
    # where candidate evaluations run (graphsearch.evaluator): 1 = in-process, N = N local
    # worker processes, None = one per core; `ray`: "auto" or a Ray cluster's address
    workers: int | None = 1
    ray: str | None = None
    on_result: Callable | None = None  # called with each finished candidate evaluation
    _model_graph: Any = None

    # ---- gates on the channels of `self.model` (variational dropout, probes)
    def gated(self, gates: dict[int, Callable[[], torch.Tensor]],
              owner: nn.Module | None = None) -> nn.Module:
        """`self.model` with every group's channels multiplied by `gates[g]()` where they are
        produced (after the norm that follows a conv/linear). Trains `self.model` in place,
        plus `owner`'s parameters (the gates')."""
        return gated(self.model_graph(), gates, owner)

    def model_graph(self) -> ChannelGraph:
        """The channel graph of `self.model`, analysed with the search graph's rules (a user's
        rules for their own modules included)."""
        if self._model_graph is None:

            self._model_graph = analyze(self.model, self.example_inputs, rules=self.graph.rules)
        return self._model_graph

    # ---- the shared target step
    def land(self, scores: dict[int, np.ndarray], least: dict[int, int] | None = None) -> Plan:
        """The shared target step on `scores`; `least`: no group under that width
        (`target.land_on_target`)."""
        return land_on_target(self.graph, scores, self.constraints, self.round_to,
                              self.latency_model, least=least)

    def land_widths(self, widths: dict[int, int],
                    importance: dict[int, np.ndarray] | None = None,
                    revive: bool = False, least: dict[int, int] | None = None) -> Plan:
        """One bisected multiplier on `widths`; groups at 0 stay at 0 unless `revive`, or
        unless no plan meets the targets with them at 0 (then they come back, last, and the
        log says so). `least`: as `land`."""

        try:
            return self.land(scores_from_widths(self.graph, widths, importance, revive), least)
        except UserError:
            if revive or not any(w == 0 for w in widths.values()):
                raise
        self.log("target step: no plan meets the targets with every group at width 0 kept at "
                 "0; those groups may come back (after every other channel)")
        return self.land(scores_from_widths(self.graph, widths, importance, True), least)

    # ---- parameters by channel
    def tied(self) -> dict[int, list[TiedSlice]]:
        return self.graph.tied_parameters()

    def channel_norms(self, model: nn.Module | None = None, squared: bool = False,
                      roles: tuple[str, ...] = ("out", "in", "gamma", "beta")
                      ) -> dict[int, torch.Tensor]:
        """Per prunable group, the L2 norm over channel c of everything tied to it (as a
        differentiable tensor of the model's parameters)."""
        model = model or self.model
        params = dict(model.named_parameters())
        out = {}
        for g in self.graph.prunable_groups:
            total = None
            for s in self.tied()[g.id]:
                if s.is_buffer or s.role not in roles or s.name not in params:
                    continue
                p = params[s.name]
                part = p.index_select(s.dim, torch.as_tensor(s.positions, device=p.device))
                sq = part.movedim(s.dim, 0).reshape(len(s.positions), -1).pow(2).sum(1)
                acc = torch.zeros(g.size, dtype=sq.dtype, device=sq.device).index_add(
                    0, torch.as_tensor(s.channels, device=sq.device), sq)
                total = acc if total is None else total + acc
            if total is not None:
                out[g.id] = total if squared else total.clamp_min(0).sqrt()
        return out

    # ---- training
    def budget_steps(self, epochs: float) -> int:
        """Optimizer steps that `self.train(model, epochs, ...)` takes (its `max_steps`): the
        trainer's own count of an epoch (`train.steps_per_epoch`), times `epochs`."""
        per_epoch = max(1, steps_per_epoch(len(self.data.train), self.batch_size, None))
        return max(1, int(round(epochs * per_epoch)))

    def train(self, model: nn.Module, epochs: float, name: str, **kwargs):
        """Train with the run's data and settings, checkpointed under `name` (resumable)."""
        whole = max(1, int(np.ceil(epochs)))
        kwargs.setdefault("lr", self.lr)
        return train(model, self.data, epochs=whole, batch_size=self.batch_size,
                     seed=self.seed, progress=self.progress,
                     checkpoint=self.state_dir / f"{name}.ckpt", desc=name,
                     max_steps=self.budget_steps(epochs), **kwargs)

    def evaluate(self, model: nn.Module) -> float:

        return evaluate(model, self.data.val)


@dataclass
class Proposal:
    plan: Plan
    state_dict: dict  # weights the slim model inherits
    info: dict = field(default_factory=dict)  # the method's own figures for the report


class Method:
    """A search method: `search(ctx) -> Proposal`."""

    name = ""
    summary = ""  # what it does, one line
    cost = ""  # what it costs, one line
    trains = True  # spends the search budget (--search-epochs) training
    defaults: dict = {}
    choices: dict = {}  # a text setting's allowed values (check_settings refuses others)
    # a number setting's allowed range, as an interval: "[1, inf)", "(0, 1]" (a setting whose
    # default is None is checked here too when it is given a number)
    bounds: dict = {}

    def check_settings(self, settings: Mapping) -> None:
        """Refuse, before any work, a setting the method does not have, a value of the wrong
        kind for a setting whose default is a number or a switch, a number outside its
        `bounds` and a text setting's value not among its `choices`. `optimize` calls it
        before the baseline is trained, each method's search again on what it is given: the
        method's rules on its settings are these, kept once."""
        unknown = sorted(set(settings) - set(self.defaults))
        if unknown:
            raise UserError(f"--set {', '.join(unknown)}: not a setting of {self.name} "
                            f"(its settings: {', '.join(self.defaults) or 'none'})")
        for key, value in settings.items():
            default = self.defaults[key]
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if isinstance(default, bool):
                ok = isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))
                kind = "true or false"
            elif isinstance(default, (int, float)):
                ok = number and (not isinstance(default, int) or float(value).is_integer())
                kind = "a whole number" if isinstance(default, int) else "a number"
            elif key in self.choices:
                ok = str(value).lower() in self.choices[key]
                kind = "one of " + ", ".join(self.choices[key])
            else:
                ok, kind = True, ""
            if ok and key in self.bounds and number:
                ok = in_interval(float(value), self.bounds[key])
                kind = f"{kind or 'a number'} in {self.bounds[key]}"
            if not ok:
                raise UserError(f"--set {key}={value!r}: {self.name}'s {key} takes {kind} "
                                f"(default {json.dumps(default)})")

    def settings_of(self, ctx: "SearchContext") -> dict:
        """The search's settings, checked (`check_settings`), over the defaults."""
        self.check_settings(ctx.settings)
        return {**self.defaults, **ctx.settings}

    def search(self, ctx: SearchContext) -> Proposal:
        raise NotImplementedError
