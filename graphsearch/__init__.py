"""graphsearch: compact architecture search on a traced channel-group IR."""

from .analysis import analyze
from .graph import ChannelGraph, ChannelGroup, Cost, PlanError
from .trace import TraceFailure

__all__ = ["analyze", "ChannelGraph", "ChannelGroup", "Cost", "PlanError", "TraceFailure"]
__version__ = "0.1.0"
