"""Save a model as a self-contained ``.pt2`` that loads without its source code.

:func:`save_portable` captures the module with ``torch.export.export`` (in eval
mode) and writes graph + weights with ``torch.export.save``; the file needs
only torch to run, not the Python classes the model was built from.
:func:`load_portable` returns ``torch.export.load(path).module()``.

The batch dimension is exported dynamic (``torch.export.Dim``). ``torch.export``
specialises dimensions whose example size is 1, so a batch-1 example is traced
as a batch of 2 (example rows repeated); the captured program is then checked
against eager torch at the example batch and at batch 3. If the dynamic export
fails or disagrees, the model is exported with the static example shapes and
:attr:`PortableInfo.note` says why.

The loaded module is an inference graph: BatchNorm uses its running statistics
and dropout is gone. torch does not support ``.eval()`` / ``.train()`` on it
(they raise), and none is needed.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from graphsearch.checkpoint import write_atomic
from graphsearch.passes.export import (as_tuple, compare_outputs, eval_mode, flatten_outputs,
                                       quiet, resize_batch, to_numpy)

__all__ = ["PortableInfo", "save_portable", "load_portable"]


@dataclass(frozen=True)
class PortableInfo:
    """What :func:`save_portable` wrote. ``file_size`` is in bytes."""

    path: Path
    dynamic_batch: bool
    file_size: int
    max_abs_diff: float
    note: str = ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _check(program_module, module: nn.Module, batches, rtol: float, atol: float) -> float:
    worst = 0.0
    with torch.no_grad():
        for batch_args in batches:
            expected = [to_numpy(t) for t in flatten_outputs(module(*batch_args))]
            actual = [to_numpy(t) for t in flatten_outputs(program_module(*batch_args))]
            worst = max(worst, compare_outputs(expected, actual, rtol=rtol, atol=atol,
                                                batch_size=batch_args[0].shape[0] if batch_args[0].dim() else None))
    return worst


def save_portable(module: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor],
                  path: str | os.PathLike, *, dynamic_batch: bool = True, rtol: float = 1e-4,
                  atol: float = 1e-5) -> PortableInfo:
    """Write ``module`` (exported in eval mode) to ``path`` as a ``.pt2`` archive.

    With ``dynamic_batch`` dim 0 of every input whose dim 0 equals the first
    input's is exported dynamic; on failure the export falls back to static
    shapes and says so in ``note``. The saved file is loaded back and checked
    against eager torch (``max |saved - torch| <= atol + rtol * max |torch|``, else
    :class:`passes.export.ExportMismatch`).
    """
    args = as_tuple(example_inputs)
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    note = ""
    program = None
    dynamic = False
    with eval_mode(module):
        if dynamic_batch and args[0].dim() >= 1:
            batch = args[0].shape[0]
            dyn = tuple(i for i, a in enumerate(args) if a.dim() >= 1 and a.shape[0] == batch)
            trace_args = resize_batch(args, dyn, 2) if batch < 2 else args
            dim = torch.export.Dim("batch", min=1)
            shapes = tuple({0: dim} if i in dyn else None for i in range(len(args)))
            other = 3 if batch != 3 else 2
            try:
                with quiet():
                    program = torch.export.export(module, trace_args, dynamic_shapes=shapes)
                _check(program.module(), module, [args, resize_batch(args, dyn, other, seed=1)], rtol, atol)
                dynamic = True
            except Exception as exc:  # noqa: BLE001 - any failure means: fall back to static shapes
                program = None
                note = (f"dynamic batch export failed ({_first_line(exc)}); "
                        f"saved with the static example shapes (batch {batch})")
        elif dynamic_batch:
            note = "the first input has no batch dimension; saved with static shapes"
        if program is None:
            with quiet():
                program = torch.export.export(module, args)
        buf = io.BytesIO()
        torch.export.save(program, buf)
        write_atomic(path, buf.getvalue(), every_rank=True)  # never a half-written model
        max_diff = _check(load_portable(path), module, [args], rtol, atol)
    return PortableInfo(path=path, dynamic_batch=dynamic, file_size=path.stat().st_size,
                        max_abs_diff=max_diff, note=note)


def load_portable(path: str | os.PathLike) -> nn.Module:
    """Load a ``.pt2`` written by :func:`save_portable` as a callable module."""
    return torch.export.load(str(path)).module()
