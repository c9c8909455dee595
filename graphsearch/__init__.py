"""graphsearch: compact architecture search on a traced channel-group IR."""

from .analysis import analyze
from .graph import ChannelGraph, ChannelGroup, Cost, PlanError
from .inplace import InPlaceError, PruneResult, prune
from .trace import TraceFailure

__all__ = ["analyze", "ChannelGraph", "ChannelGroup", "Cost", "PlanError", "TraceFailure",
           "prune", "PruneResult", "InPlaceError"]
__version__ = "0.1.0"
