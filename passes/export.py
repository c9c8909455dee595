"""Export a (rewritten) model to ONNX and prove the file computes the same thing.

:func:`export_onnx` exports an ``nn.Module`` or ``torch.fx.GraphModule`` with a
dynamic batch dimension, runs ``onnx.checker.check_model`` on the file, then
runs it in onnxruntime (CPUExecutionProvider) on the example inputs *and* on a
batch of a different size and compares every output with eager torch. A
disagreement beyond ``atol + rtol * max|torch|`` (per output; see
:func:`compare_outputs`) raises :class:`ExportMismatch`;
anything that keeps a checked file from being produced raises
:class:`ExportError`.

Exporter choice
---------------
torch 2.13 ships two exporters: the TorchScript exporter
(``torch.onnx.export(..., dynamo=False)``, ``dynamic_axes``) and the
``torch.export``-based "dynamo" exporter (the default of ``torch.onnx.export``,
``dynamic_shapes``). Both were tried on fx GraphModules covering conv, BN,
linear, cat, split/chunk, getitem slices and index lists, index_select,
view/reshape/flatten/unflatten, permute, channel shuffle, pixel shuffle,
adaptive avg pool (1x1 and 2x2), interpolate (size and scale_factor), pad
(constant and reflect), LayerNorm, and ``F.scaled_dot_product_attention`` with
an explicit ``scale=`` (also with ``is_causal`` and a boolean mask), and on
every model of ``graphsearch.zoo`` traced with ``torch.fx.symbolic_trace``.
Both produced correct files (relative error < 1e-6 at batch 1 and 3) for all of
them, so the choice came down to the remaining differences:

* **Speed.** The TorchScript exporter took 0.03-1.8 s per model, the dynamo
  exporter 0.6-10 s (resnet20: 0.13 s vs 3.5 s; densenet121: 0.8 s vs 10 s).
  A search exports many candidates, so this is a 10x difference in the loop.
* **Batch 1.** ``torch.export`` specialises a dimension whose example size is 1,
  so the dynamo exporter exported ``vit_tiny`` from a batch-1 example with a
  *static* batch (the ``cls_token.expand(x.shape[0], ...)`` pins it) without an
  error; the file then failed at batch 3. It needs a batch >= 2 tracing example,
  which this module fabricates (rows repeated) when that exporter is used. The
  TorchScript exporter keeps the ``size()`` reads that ``symbolic_trace``
  records as Shape ops, so a batch-1 example exports a truly dynamic batch.
* **Noise.** The dynamo exporter prints progress lines and logs registry
  warnings through ``logging``; the TorchScript exporter emits a
  ``DeprecationWarning`` and, on failure, dumps the TorchScript graph to
  stderr. Both are silenced here (at the file-descriptor level) either way.
* **Future.** The TorchScript exporter is deprecated (a ``DeprecationWarning``
  says it "will be removed"); the dynamo exporter is where fixes land.

So ``exporter="auto"`` (the default) uses the TorchScript exporter and falls
back to the dynamo exporter only when the TorchScript exporter raises (e.g. an
operator it has no symbolic for); a graph that ``torch.export`` made (its sizes
read by ``aten.sym_size`` nodes, which TorchScript tracing turns into constants)
goes to the dynamo exporter first; ``exporter="torchscript"`` or
``exporter="dynamo"`` pin one. :attr:`ExportResult.exporter` says which one
wrote the file. With ``opset=None`` the exporter's default opset is used (20 in
torch 2.13 for both) and the opset actually written is reported. An explicit
``opset`` that does not end up in the file raises :class:`ExportError` (the
dynamo exporter quietly keeps its own opset when version conversion fails: asked
for opset 99 it wrote opset 18).

Silencing works by redirecting file descriptors 1 and 2 while the exporter runs,
so it is not thread-safe; the captured text is attached to :class:`ExportError`
when an export fails.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graphsearch.errors import ExportError, ExportMismatch

__all__ = ["ExportResult", "ExportError", "ExportMismatch", "export_onnx", "check_onnx"]

_EXPORTERS = ("auto", "torchscript", "dynamo")
_BATCH_DIM_NAME = "batch"


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote and how closely it matches torch.

    ``max_abs_diff`` is the largest absolute output difference over all checked
    batch sizes (``checked_batch_sizes``); ``file_size`` is in bytes.
    """

    path: Path
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    max_abs_diff: float
    file_size: int
    exporter: str = "torchscript"
    dynamic_batch: bool = True
    checked_batch_sizes: tuple[int, ...] = field(default=())

    def __str__(self) -> str:
        return (f"{self.path.name}: opset {self.opset}, {self.file_size / 1e6:.2f} MB, "
                f"max |onnx - torch| {self.max_abs_diff:.3g} at batch {list(self.checked_batch_sizes)} "
                f"({self.exporter} exporter)")


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, restoring each one's flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
    except Exception:  # torch.export'ed modules refuse .eval(); they are already inference graphs
        pass
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class _Captured:
    text: str = ""


@contextlib.contextmanager
def quiet() -> Iterator[_Captured]:
    """Swallow warnings, ``torch.onnx`` / ``onnxscript`` logging and everything
    written to stdout / stderr (Python and C++ alike) while the block runs."""
    captured = _Captured()
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    buffer = io.StringIO()
    saved_fds: list[int] = []
    tmp = tempfile.TemporaryFile(mode="w+b")
    try:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        try:
            saved_fds = [os.dup(1), os.dup(2)]
            os.dup2(tmp.fileno(), 1)
            os.dup2(tmp.fileno(), 2)
        except OSError:  # no real fds (embedded interpreters): Python-level capture only
            for fd in saved_fds:
                os.close(fd)
            saved_fds = []
        with warnings.catch_warnings(), contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            warnings.simplefilter("ignore")
            yield captured
    finally:
        if saved_fds:
            for stream in (sys.__stdout__, sys.__stderr__):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)
        tmp.seek(0)
        captured.text = buffer.getvalue() + tmp.read().decode("utf-8", errors="replace")
        tmp.close()
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        chain.append(cur)
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return chain


def _failing_op(exc: BaseException) -> str | None:
    """Best-effort name of the operator an exporter error is about."""
    texts = [_ANSI.sub("", str(e)) for e in _exception_chain(exc)]
    for text in texts:  # dynamo exporter: "... call_function[target=torch.ops.aten.foo.default] ..."
        m = re.search(r"target=torch\.ops\.(\w+)\.(\w+)", text)
        if m:
            return f"{m.group(1)}::{m.group(2)}"
    for text in texts:  # TorchScript exporter: "operator 'aten::foo'", "namespace ns::foo"
        m = re.search(r"operator '(\w+::\w+)'", text) or re.search(r"namespace (\w+::\w+)", text)
        if m:
            return m.group(1)
    for text in texts:
        m = re.search(r"\b((?:aten|prim|onnx|quantized|[a-z_][a-z0-9_]*)::[A-Za-z_]\w*)", text)
        if m and not m.group(1).startswith(("c10::", "std::", "torch::")):
            return m.group(1)
    return None


def _short(text: str, limit: int = 800) -> str:
    text = _ANSI.sub("", text).strip()
    return text if len(text) <= limit else text[:limit] + " ..."


def _first_lines(text: str, lines: int = 2, limit: int = 400) -> str:
    kept = [line.strip() for line in _ANSI.sub("", text).strip().splitlines() if line.strip()][:lines]
    return _short(" ".join(kept), limit)


def as_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not args:
        raise ValueError("example_inputs is empty; pass a tensor or a tuple of tensors")
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"example_inputs[{i}] is a {type(a).__name__}; only tensors are supported")
    return args


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flatten_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in flatten_outputs(o)]
    if out is None:
        return []
    raise TypeError(f"cannot export a model output of type {type(out).__name__}")


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().resolve_conj().resolve_neg().numpy()


def _dynamic_inputs(args: tuple[torch.Tensor, ...], dynamic_batch: bool | Sequence[int]) -> tuple[int, ...]:
    if dynamic_batch is False or dynamic_batch is None:
        return ()
    if dynamic_batch is True:
        if args[0].dim() == 0:
            raise ValueError("dynamic_batch=True needs a first input with a batch dimension")
        batch = args[0].shape[0]
        return tuple(i for i, a in enumerate(args) if a.dim() >= 1 and a.shape[0] == batch)
    indices = tuple(int(i) for i in dynamic_batch)
    for i in indices:
        if not 0 <= i < len(args) or args[i].dim() == 0:
            raise ValueError(f"dynamic_batch index {i} does not name an input with a batch dimension")
    return indices


def resize_batch(args: tuple[torch.Tensor, ...], dynamic: tuple[int, ...], batch: int,
                  seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs of batch ``batch`` made from the example rows (cycled), with a
    little noise on floating inputs so that the rows differ."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i, a in enumerate(args):
        if i not in dynamic:
            out.append(a)
            continue
        rows = a[torch.arange(batch) % a.shape[0]]
        if rows.is_floating_point() and rows.numel():
            scale = float(a.float().std()) if a.numel() > 1 else 1.0
            scale = scale if math.isfinite(scale) and scale > 0 else 1.0
            noise = torch.randn(rows.shape, generator=generator, dtype=torch.float32) * (0.1 * scale)
            rows = rows + noise.to(device=rows.device, dtype=rows.dtype)
        out.append(rows.contiguous())
    return tuple(out)


def _default_names(prefix: str, n: int) -> tuple[str, ...]:
    return (prefix,) if n == 1 else tuple(f"{prefix}{i}" for i in range(n))


# --------------------------------------------------------------------------- exporters


def _export_torchscript(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, opset: int | None,
                        input_names: tuple[str, ...], output_names: tuple[str, ...],
                        dynamic: tuple[int, ...], outputs: list[torch.Tensor]) -> None:
    dynamic_axes: dict[str, dict[int, str]] | None = None
    if dynamic:
        dynamic_axes = {input_names[i]: {0: _BATCH_DIM_NAME} for i in dynamic}
        dynamic_axes.update({name: {0: _BATCH_DIM_NAME} for name, o in zip(output_names, outputs) if o.dim() >= 1})
    torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset,
                      input_names=list(input_names), output_names=list(output_names),
                      dynamic_axes=dynamic_axes, do_constant_folding=True)


def _export_dynamo(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, opset: int | None,
                   input_names: tuple[str, ...], output_names: tuple[str, ...],
                   dynamic: tuple[int, ...], outputs: list[torch.Tensor]) -> None:
    dynamic_shapes = None
    if dynamic:
        # torch.export specialises size-1 dims, so trace with a batch of at least 2.
        if args[dynamic[0]].shape[0] < 2:
            args = resize_batch(args, dynamic, 2)
        batch = torch.export.Dim(_BATCH_DIM_NAME, min=1)
        dynamic_shapes = tuple({0: batch} if i in dynamic else None for i in range(len(args)))
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    n_bytes += sum(b.numel() * b.element_size() for b in module.buffers())
    torch.onnx.export(module, args, str(path), dynamo=True, opset_version=opset,
                      input_names=list(input_names), output_names=list(output_names),
                      dynamic_shapes=dynamic_shapes, external_data=n_bytes > 1_500_000_000,
                      optimize=True, report=False, verify=False)


_EXPORTER_FUNCS = {"torchscript": _export_torchscript, "dynamo": _export_dynamo}


def _symbolic_sizes(module: nn.Module) -> bool:
    """A graph that reads sizes with `aten.sym_size` (a `torch.export` graph: its batch is a
    symbol) rather than with `Tensor.size()` calls, which the TorchScript exporter records."""
    graph = getattr(module, "graph", None)
    return graph is not None and any(
        n.op == "call_function" and n.target is torch.ops.aten.sym_size.int for n in graph.nodes)


def _run_exporter(exporter: str, module: nn.Module, args: tuple[torch.Tensor, ...], path: Path,
                  opset: int | None, input_names: tuple[str, ...], output_names: tuple[str, ...],
                  dynamic: tuple[int, ...], outputs: list[torch.Tensor]) -> None:
    """Write ``path`` with ``exporter``; raises :class:`ExportError` on failure."""
    with quiet() as log:
        try:
            _EXPORTER_FUNCS[exporter](module, args, path, opset, input_names, output_names, dynamic, outputs)
        except Exception as exc:  # noqa: BLE001 - every exporter failure becomes an ExportError
            failure = exc
        else:
            failure = None
    if failure is not None:
        op = _failing_op(failure)
        where = f" on operator {op}" if op else ""
        detail = _first_lines(str(failure))
        causes = [e for e in _exception_chain(failure)[1:] if str(e).strip()]
        if causes:
            detail += f" (caused by {type(causes[-1]).__name__}: {_first_lines(str(causes[-1]))})"
        raise ExportError(f"ONNX export with the {exporter} exporter failed{where}: "
                          f"{type(failure).__name__}: {detail}",
                          op=op, exporter=exporter, log=log.text) from failure
    if not path.exists():
        raise ExportError(f"the {exporter} exporter wrote no file at {path}", exporter=exporter, log=log.text)


# --------------------------------------------------------------------------- checking


def check_onnx(path: str | os.PathLike) -> None:
    """``onnx.checker.check_model`` (with shape inference); raises :class:`ExportError`."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - ValidationError, InferenceError, DecodeError, ...
        raise ExportError(f"ONNX checker rejected {path}: {type(exc).__name__}: {_short(str(exc))}") from exc


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"onnxruntime could not load {path}: {_short(str(exc))}") from exc


def _run_onnx(session, input_names: tuple[str, ...], args: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    """Run ``session`` on ``args`` (fed by name; inputs the exporter dropped are skipped)."""
    feeds_by_name = dict(zip(input_names, args))
    feeds = {}
    for inp in session.get_inputs():
        if inp.name not in feeds_by_name:
            raise ExportError(f"the ONNX model has an input {inp.name!r} that is not one of {list(input_names)}")
        feeds[inp.name] = to_numpy(feeds_by_name[inp.name])
    return session.run(None, feeds)


def _fmt_index(index: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(i) for i in index) + ")" if index else "()"


def compare_outputs(expected: Sequence[np.ndarray], actual: Sequence[np.ndarray], *, rtol: float, atol: float,
                     output_names: Sequence[str] | None = None, batch_size: int | None = None) -> float:
    """Largest ``|actual - expected|`` over all outputs.

    Output ``k`` passes when ``max |onnx - torch| <= atol + rtol * max |torch|``
    (the max of ``|torch|`` over that output's finite values). The relative
    part scales with the output's magnitude rather than with each element
    because float32 rounding error grows with the size of the values summed,
    not with the result: an element that cancels to ~0 inside an output of size
    ~1e6 legitimately differs by ~1 (densenet121 with random weights has
    outputs ~5.8e6 and differences of ~3, which an elementwise ``allclose``
    rejects). NaN matches only NaN, infinities only the same infinity.

    Raises :class:`ExportMismatch` naming the output, the batch, the largest
    absolute difference, where it occurs and the tolerance; also when shapes or
    output counts differ.
    """
    at = f" at batch {batch_size}" if batch_size is not None else ""
    if len(expected) != len(actual):
        raise ExportMismatch(f"the ONNX model returned {len(actual)} outputs{at}, torch returned {len(expected)}",
                             batch_size=batch_size, rtol=rtol, atol=atol)
    worst = 0.0
    for k, (exp, act) in enumerate(zip(expected, actual)):
        exp, act = np.asarray(exp), np.asarray(act)
        name = output_names[k] if output_names is not None and k < len(output_names) else None
        label = f"output {k}" + (f" ({name!r})" if name else "")
        if exp.shape != act.shape:
            raise ExportMismatch(f"ONNX {label}{at} has shape {tuple(act.shape)}, torch has {tuple(exp.shape)}",
                                 output_index=k, output_name=name, batch_size=batch_size, index=None,
                                 rtol=rtol, atol=atol)
        if exp.size == 0:
            continue
        e64, a64 = exp.astype(np.float64), act.astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(a64 - e64)
        same = (np.isnan(a64) & np.isnan(e64)) | (np.isinf(a64) & (a64 == e64))
        diff[same] = 0.0
        diff[np.isnan(diff)] = np.inf  # NaN against a number, or opposite infinities
        finite = np.abs(e64[np.isfinite(e64)])
        scale = float(finite.max()) if finite.size else 0.0
        tolerance = atol + rtol * scale
        flat = int(np.argmax(diff))
        max_diff = float(diff.flat[flat])
        worst = max(worst, max_diff)
        if not max_diff <= tolerance:
            index = tuple(int(i) for i in np.unravel_index(flat, diff.shape))
            n_bad = int((diff > tolerance).sum())
            raise ExportMismatch(
                f"ONNX {label}{at} differs from torch: largest |onnx - torch| = {max_diff:.6g} at index "
                f"{_fmt_index(index)} (onnx {a64.flat[flat]:.6g}, torch {e64.flat[flat]:.6g}) exceeds the "
                f"tolerance {tolerance:.3g} = atol {atol:g} + rtol {rtol:g} * max|torch| {scale:.3g} "
                f"({n_bad} of {diff.size} elements exceed it)",
                output_index=k, output_name=name, batch_size=batch_size, max_abs_diff=max_diff,
                index=index, rtol=rtol, atol=atol)
    return worst


def _opset_of(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return -1


def _file_size(path: Path) -> int:
    """Bytes of ``path`` plus any external-data files it references."""
    import onnx

    size = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    for loc in locations:
        with contextlib.suppress(OSError):
            size += (path.parent / loc).stat().st_size
    return size


# --------------------------------------------------------------------------- entry point


def export_onnx(module: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor],
                path: str | os.PathLike, *, opset: int | None = None,
                dynamic_batch: bool | Sequence[int] = True, rtol: float = 1e-4, atol: float = 1e-5,
                exporter: str = "auto", input_names: Sequence[str] | None = None,
                output_names: Sequence[str] | None = None, check_batch_size: int | None = 3) -> ExportResult:
    """Export ``module`` to ONNX at ``path`` and verify it against eager torch.

    ``module`` is exported in eval mode; every submodule's training flag is
    restored afterwards. ``example_inputs`` is a tensor or a tuple of tensors.

    ``dynamic_batch=True`` makes dim 0 dynamic on every input whose dim 0 equals
    the first input's (and on every output); a sequence of input indices picks
    them explicitly; ``False`` exports static shapes. With a dynamic batch the
    file is also run at batch ``check_batch_size`` (default 3; 2 if the example
    batch is already 3; ``None`` skips it) on inputs made by cycling the example
    rows plus a little noise.

    Every output must satisfy ``max |onnx - torch| <= atol + rtol * max |torch|``
    (see :func:`compare_outputs` for why the relative part uses the output's
    largest magnitude), else :class:`ExportMismatch` is raised naming the
    output, the largest absolute difference, where it occurs and the tolerance. Exporter failures, checker
    failures and files onnxruntime cannot load or run raise
    :class:`ExportError`. See the module docstring for ``exporter``.
    """
    if exporter not in _EXPORTERS:
        raise ValueError(f"exporter must be one of {_EXPORTERS}, got {exporter!r}")
    args = as_tuple(example_inputs)
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic = _dynamic_inputs(args, dynamic_batch)

    with eval_mode(module):
        with torch.no_grad():
            ref = flatten_outputs(module(*args))
        if not ref:
            raise ValueError("the model returns no tensors; nothing to export")
        in_names = tuple(input_names) if input_names is not None else _default_names("input", len(args))
        out_names = tuple(output_names) if output_names is not None else _default_names("output", len(ref))
        if len(in_names) != len(args) or len(out_names) != len(ref) or len(set(in_names + out_names)) != len(
                in_names) + len(out_names):
            raise ValueError(f"need {len(args)} input and {len(ref)} output names, all distinct; "
                             f"got {list(in_names)} and {list(out_names)}")

        check_batches: list[tuple[int, tuple[torch.Tensor, ...]]] = [
            (args[dynamic[0]].shape[0] if dynamic else (args[0].shape[0] if args[0].dim() else 1), args)]
        if dynamic and check_batch_size is not None:
            other = check_batch_size if check_batch_size != check_batches[0][0] else check_batch_size - 1
            if other < 1:
                other = check_batch_size + 1
            check_batches.append((other, resize_batch(args, dynamic, other, seed=1)))
        expected = []
        with torch.no_grad():
            for batch, batch_args in check_batches:
                outs = ref if batch_args is args else flatten_outputs(module(*batch_args))
                expected.append([to_numpy(o) for o in outs])

        order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
        if exporter == "auto" and _symbolic_sizes(module):
            order.reverse()  # the TorchScript exporter would write those sizes as constants
        errors: list[ExportError] = []
        used = None
        for name in order:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            try:
                _run_exporter(name, module, args, path, opset, in_names, out_names, dynamic, ref)
            except ExportError as exc:
                errors.append(exc)
                continue
            used = name
            break
        if used is None:
            last = errors[-1]
            if len(errors) == 1:
                raise last
            op = next((e.op for e in errors if e.op), None)
            raise ExportError("ONNX export failed with every exporter" + (f" (operator {op})" if op else "")
                              + ":\n  " + "\n  ".join(str(e) for e in errors),
                              op=op, exporter=last.exporter, log=last.log) from last

    written_opset = _opset_of(path)
    if opset is not None and written_opset != opset:
        raise ExportError(f"asked for opset {opset} but the {used} exporter wrote opset {written_opset}",
                          exporter=used)
    check_onnx(path)
    session = _session(path)
    max_diff = 0.0
    for (batch, batch_args), exp in zip(check_batches, expected):
        try:
            actual = _run_onnx(session, in_names, batch_args)
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime errors
            hint = (" (the batch dimension may have been baked into the graph, e.g. by a reshape to a "
                    "constant batch size)") if batch_args is not args else ""
            raise ExportError(f"onnxruntime failed to run {path.name} at batch {batch}{hint}: "
                              f"{_short(str(exc))}", exporter=used) from exc
        max_diff = max(max_diff, compare_outputs(exp, actual, rtol=rtol, atol=atol,
                                                  output_names=out_names, batch_size=batch))

    return ExportResult(path=path, opset=written_opset, input_names=in_names, output_names=out_names,
                        max_abs_diff=max_diff, file_size=_file_size(path), exporter=used,
                        dynamic_batch=bool(dynamic), checked_batch_sizes=tuple(b for b, _ in check_batches))
