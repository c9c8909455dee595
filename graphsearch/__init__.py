"""graphsearch: compact architecture search on a traced channel-group IR."""

from .analysis import analyze
from .errors import UserError
from .graph import ChannelGraph, ChannelGroup, Cost, PlanError
from .api import OptimizeResult
from .inplace import InPlaceError, PruneResult, prune
from .trace import TraceFailure

__all__ = ["analyze", "ChannelGraph", "ChannelGroup", "Cost", "PlanError", "TraceFailure",
           "prune", "PruneResult", "InPlaceError", "optimize", "OptimizeResult", "UserError"]
__version__ = "0.1.0"


def _callable_pipeline_module() -> None:
    """`graphsearch.optimize` is both the pipeline's module (`graphsearch.optimize.prepare`,
    what the CLI and the tests import) and the Python API's function
    (`graphsearch.optimize(model, example_inputs, ...)`, `graphsearch.api.optimize`): calling
    the module calls the function."""
    import sys
    import types

    from . import optimize as module

    class _PipelineModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            from .api import optimize

            return optimize(*args, **kwargs)

    module.__class__ = _PipelineModule
    sys.modules[__name__ + ".optimize"] = module


_callable_pipeline_module()
del _callable_pipeline_module
