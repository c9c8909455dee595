"""Rewrite passes: export, latency measurement and portable saving."""

from .export import ExportError, ExportMismatch, ExportResult, export_onnx
from .latency import Latency, latency, parse_latency
from .save import PortableInfo, load_portable, save_portable

__all__ = [
    "export_onnx", "ExportResult", "ExportMismatch", "ExportError",
    "latency", "Latency", "parse_latency",
    "save_portable", "load_portable", "PortableInfo",
]
