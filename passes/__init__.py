"""Rewrite passes over a traced model, installed as ``graphsearch.passes``.

One submodule per pass, each named for what it does, and never shadowed by a function of the
same name: ``slim.slim(graph, keep)`` (a really smaller fx module; ``slim.unslim_state`` maps
its weights back), ``mask.mask(graph, keep)`` (the same architecture with the dropped channels
zeroed) and ``mask.verify(a, b, inputs)``; ``gates`` (per-channel gates and their folding),
``plan`` (a keep plan resolved against the graph), ``export`` (ONNX with an onnxruntime
check), ``latency`` (``latency.latency(path, ...)``) and ``save`` (portable saving). The names
no submodule shares are re-exported here.
"""

from graphsearch.passes import export, gates, latency, mask, plan, save, slim
from graphsearch.passes.export import ExportError, ExportMismatch, ExportResult, export_onnx
from graphsearch.passes.latency import Latency, parse_latency
from graphsearch.passes.mask import verify
from graphsearch.passes.save import PortableInfo, load_portable, save_portable

__all__ = [
    "slim", "mask", "gates", "plan", "export", "latency", "save", "verify",
    "export_onnx", "ExportResult", "ExportMismatch", "ExportError",
    "Latency", "parse_latency",
    "save_portable", "load_portable", "PortableInfo",
]
