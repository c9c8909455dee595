"""The project's exceptions, in one module that imports nothing of the project.

Every other module may raise them; none has to import a module above it (ARCHITECTURE.md's
order) to do so. The modules where they used to live re-export them.
"""

from __future__ import annotations

import math


class UserError(Exception):
    """A problem with what the user gave us; the CLI prints it in one line, no traceback."""


class RuleConflict(UserError):
    """Two different rules registered for the same module type, function or method."""


class PlanError(ValueError):
    """A plan (widths or kept indices) that the graph cannot realise."""


class TraceFailure(RuntimeError):
    """The model could not be traced at all; the message says what to do."""


class ExportError(RuntimeError):
    """The model could not be exported to a valid, runnable ONNX file.

    ``op`` names the operator the exporter choked on when it could be found in
    the exporter's error (e.g. ``"aten::linalg_svd"``), else ``None``;
    ``exporter`` is the exporter that failed last; ``log`` holds what the
    exporter printed while it ran.
    """

    def __init__(self, message: str, *, op: str | None = None, exporter: str | None = None,
                 log: str = "") -> None:
        super().__init__(message)
        self.op = op
        self.exporter = exporter
        self.log = log


class ExportMismatch(ValueError):
    """ONNX Runtime and eager torch disagree beyond the tolerance.

    Attributes mirror the message: ``output_index``, ``output_name``,
    ``batch_size``, ``max_abs_diff``, ``index`` (where the largest absolute
    difference occurs, or ``None`` for a shape / count mismatch), ``rtol``,
    ``atol``.
    """

    def __init__(self, message: str, *, output_index: int | None = None,
                 output_name: str | None = None, batch_size: int | None = None,
                 max_abs_diff: float = math.inf, index: tuple[int, ...] | None = None,
                 rtol: float = 0.0, atol: float = 0.0) -> None:
        super().__init__(message)
        self.output_index = output_index
        self.output_name = output_name
        self.batch_size = batch_size
        self.max_abs_diff = max_abs_diff
        self.index = index
        self.rtol = rtol
        self.atol = atol
