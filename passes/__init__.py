"""Rewrite passes over a traced model, installed as ``graphsearch.passes``.

The contract of ARCHITECTURE.md: ``slim(graph, keep)`` (a really smaller fx module),
``mask(graph, keep)`` (the same architecture with the dropped channels zeroed) and
``verify(a, b, inputs)``; ONNX export with an onnxruntime check, latency measurement and
portable saving.
"""

from .export import ExportError, ExportMismatch, ExportResult, export_onnx
from .latency import Latency, latency, parse_latency
from .mask import mask, verify
from .save import PortableInfo, load_portable, save_portable
from .slim import slim

__all__ = [
    "slim", "mask", "verify",
    "export_onnx", "ExportResult", "ExportMismatch", "ExportError",
    "latency", "Latency", "parse_latency",
    "save_portable", "load_portable", "PortableInfo",
]
