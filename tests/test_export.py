"""ONNX export with verification, ORT latency, latency parsing and portable .pt2 saving."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import graphsearch
from graphsearch import passes
from graphsearch.passes import (ExportError, ExportMismatch, Latency, export_onnx, load_portable, parse_latency,
                    save_portable)
from graphsearch.export_trace import export_trace
from graphsearch.passes.latency import latency
from graphsearch.passes import export as export_mod

# --------------------------------------------------------------------------- tiny models


class TinyResBlock(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.down = nn.Sequential(nn.Conv2d(c, 2 * c, 1, stride=2, bias=False), nn.BatchNorm2d(2 * c))
        self.conv3 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * c, 5)
        for bn in (self.bn0, self.bn1, self.bn2, self.bn3, self.down[1]):  # non-trivial running stats
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(y)))
        x = F.relu(self.down(x) + self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def channel_shuffle(x, groups: int):
    b, c, h, w = x.size()
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)


class ConcatSplitShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.left = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4), nn.ReLU())
        self.right = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        x = self.conv(x)
        a, b = x.split(4, dim=1)
        x = channel_shuffle(torch.cat([self.left(a), self.right(b)], 1), 2)
        x = torch.cat([x[:, :2], x[:, 2:6] * 0.5, x[:, 6:]], dim=1)
        x = F.adaptive_avg_pool2d(x, (4, 4))
        return self.head(x.reshape(x.shape[0], -1))


class TinyAttention(nn.Module):
    """Pre-norm self-attention with an explicit, non-default SDPA scale."""

    def __init__(self, dim=16, heads=2, scale=0.7):
        super().__init__()
        self.heads, self.head_dim, self.scale = heads, dim // heads, scale
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        qkv = self.qkv(self.norm(x)).unflatten(-1, (3, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
        return x + self.proj(out.transpose(1, 2).flatten(2))


class KitchenSink(nn.Module):
    """Ops a rewrite may leave behind: pixel shuffle, interpolate, pad, permute, getitem, index_select."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.ps = nn.PixelShuffle(2)
        self.register_buffer("keep", torch.tensor([0, 1, 3]))
        self.fc = nn.Linear(3 * 4, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = self.ps(x)                                   # (B, 4, 2H, 2W)
        x = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        x = F.pad(x, (1, 1, 1, 1))
        x = x.permute(0, 2, 3, 1)[..., :4].permute(0, 3, 1, 2)
        x = x.index_select(1, self.keep)
        x = F.adaptive_avg_pool2d(x, (2, 2))
        return self.fc(x.flatten(1)), x.mean((2, 3))


def _ort_run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})


# --------------------------------------------------------------------------- export_onnx


def test_resnet_block_round_trip(tmp_path):
    model = TinyResBlock().eval()
    x = torch.randn(1, 3, 12, 12)
    result = export_onnx(model, (x,), tmp_path / "res.onnx")
    assert result.path == (tmp_path / "res.onnx").absolute() and result.path.exists()
    assert result.file_size == result.path.stat().st_size > 0
    assert result.input_names == ("input",) and result.output_names == ("output",)
    assert result.opset >= 13
    assert result.exporter == "torchscript"
    assert result.checked_batch_sizes == (1, 3)
    assert 0 <= result.max_abs_diff < 1e-4
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(_ort_run(result.path, x)[0], ref, rtol=1e-4, atol=1e-5)


def test_concat_split_shuffle_graph_module(tmp_path):
    gm = torch.fx.symbolic_trace(ConcatSplitShuffle())
    assert isinstance(gm, torch.fx.GraphModule)
    result = export_onnx(gm, torch.randn(2, 3, 8, 8), tmp_path / "shuffle.onnx")
    assert result.checked_batch_sizes == (2, 3)
    assert result.max_abs_diff < 1e-4


def test_attention_sdpa_explicit_scale(tmp_path):
    torch.manual_seed(1)
    model = TinyAttention(scale=0.7).eval()
    x = torch.randn(2, 5, 16)
    result = export_onnx(torch.fx.symbolic_trace(model), x, tmp_path / "attn.onnx")
    # the scale must survive export: the default 1/sqrt(8) gives a visibly different result
    default = TinyAttention(scale=None).eval()
    default.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (default(x) - model(x)).abs().max() > 1e-3
        np.testing.assert_allclose(_ort_run(result.path, x)[0], model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_kitchen_sink_graph_module_multiple_outputs(tmp_path):
    gm = torch.fx.symbolic_trace(KitchenSink())
    result = export_onnx(gm, torch.randn(1, 3, 6, 6), tmp_path / "sink.onnx")
    assert result.output_names == ("output0", "output1")
    assert result.max_abs_diff < 1e-4


def test_dynamic_batch_in_file(tmp_path):
    model = TinyResBlock().eval()
    result = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "dyn.onnx")
    graph = onnx.load(str(result.path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(_ort_run(result.path, x)[0], model(x).numpy(), rtol=1e-4, atol=1e-5)


class WindowAttention(nn.Module):
    """Swin's window attention as `torch.export` records it: windows folded into the batch,
    attention with a per-head bias, its output made contiguous and reshaped by a size
    computed from the batch."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(8, 16) for _ in range(3))
        self.out = nn.Linear(16, 3)
        self.bias = nn.Parameter(torch.randn(4, 4, 2))

    def forward(self, x):  # (batch, windows, tokens, 8)
        b, w, t, _ = x.shape
        x = x.view(-1, t, 8)
        q, k, v = (f(x).view(b * w, t, -1, 8).transpose(1, 2) for f in (self.q, self.k, self.v))
        mask = self.bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.reshape(b * w, -1, t, 8).transpose(1, 2).contiguous().reshape(b * w, t, -1)
        return self.out(y)


def test_an_exported_graph_keeps_its_dynamic_batch_in_onnx(tmp_path):
    torch.manual_seed(0)
    x = (torch.randn(2, 4, 4, 8),)
    traced = export_trace(WindowAttention().eval(), x)
    assert traced.static_batch == ""
    res = export_onnx(traced.module, x, tmp_path / "windows.onnx", check_batch_size=3)
    assert res.exporter == "dynamo"
    sess = ort.InferenceSession(str(tmp_path / "windows.onnx"), providers=["CPUExecutionProvider"])
    x5 = torch.randn(5, 4, 4, 8)
    got = sess.run(None, {sess.get_inputs()[0].name: x5.numpy()})[0]
    np.testing.assert_allclose(got, traced.module(x5)[0].detach().numpy(), rtol=1e-4, atol=1e-5)


def test_static_batch(tmp_path):
    result = export_onnx(TinyResBlock(), torch.randn(2, 3, 8, 8), tmp_path / "static.onnx", dynamic_batch=False)
    assert not result.dynamic_batch and result.checked_batch_sizes == (2,)
    dim0 = onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_value == 2


def test_dynamo_exporter_batch_one(tmp_path):
    """The dynamo exporter gets a batch-2 tracing example, so a batch-1 example still exports a dynamic batch."""
    model = TinyAttention().eval()
    result = export_onnx(model, torch.randn(1, 4, 16), tmp_path / "dynamo.onnx", exporter="dynamo")
    assert result.exporter == "dynamo" and result.checked_batch_sizes == (1, 3)


def test_explicit_opset(tmp_path):
    result = export_onnx(TinyResBlock(), torch.randn(1, 3, 8, 8), tmp_path / "o17.onnx", opset=17)
    assert result.opset == 17
    assert {o.version for o in onnx.load(str(result.path)).opset_import if o.domain in ("", "ai.onnx")} == {17}
    with pytest.raises(ExportError, match="opset 99"):
        export_onnx(TinyResBlock(), torch.randn(1, 3, 8, 8), tmp_path / "o99.onnx", opset=99)


def test_training_flags_restored(tmp_path):
    model = TinyResBlock().train()
    model.fc.eval()  # a mixed state must come back exactly
    stats = model.bn1.running_mean.clone()
    export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "train.onnx")
    assert model.training and model.bn1.training and not model.fc.training
    assert torch.equal(model.bn1.running_mean, stats)  # eval mode: running stats untouched


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(TinyResBlock(), torch.randn(1, 3, 8, 8), tmp_path / "x.onnx", exporter="tflite")
    with pytest.raises(TypeError, match="tensors"):
        export_onnx(TinyResBlock(), (torch.randn(1, 3, 8, 8), 3), tmp_path / "x.onnx")


# --------------------------------------------------------------------------- failures


def test_compare_outputs_names_largest_difference():
    expected = [np.zeros((2, 3), np.float32), np.arange(12, dtype=np.float32).reshape(3, 4)]
    actual = [expected[0].copy(), expected[1].copy()]
    actual[1][2, 1] += 0.25
    actual[1][0, 3] += 0.01
    with pytest.raises(ExportMismatch) as info:
        export_mod.compare_outputs(expected, actual, rtol=1e-4, atol=1e-5, output_names=["a", "b"], batch_size=3)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.output_index == 1 and err.index == (2, 1) and err.batch_size == 3
    assert err.max_abs_diff == pytest.approx(0.25)
    msg = str(err)
    assert "output 1 ('b')" in msg and "0.25" in msg and "(2, 1)" in msg
    assert "tolerance 0.00111 = atol 1e-05 + rtol 0.0001 * max|torch| 11" in msg and "batch 3" in msg
    assert "(2 of 12 elements exceed it)" in msg
    # within tolerance: returns the largest difference
    actual[1] = expected[1] + 1e-6
    assert export_mod.compare_outputs(expected, actual, rtol=1e-4, atol=1e-5) == pytest.approx(1e-6, rel=0.1)


def test_compare_outputs_tolerance_scales_with_output_magnitude():
    """float32 error follows the output's scale: ~0 elements of a ~6e6 output may be off by a few units."""
    expected = np.array([5.8e6, -3.1e6, 0.5], np.float32)
    actual = expected + np.array([0.5, -1.0, 3.0], np.float32)
    assert export_mod.compare_outputs([expected], [actual], rtol=1e-4, atol=1e-5) == pytest.approx(3.0)
    actual[2] += 1000.0  # beyond 1e-4 * 5.8e6 = 580
    with pytest.raises(ExportMismatch, match=r"at index \(2\)"):
        export_mod.compare_outputs([expected], [actual], rtol=1e-4, atol=1e-5)


def test_compare_outputs_shape_nan_and_count():
    e = np.ones((2, 2), np.float32)
    with pytest.raises(ExportMismatch, match="shape"):
        export_mod.compare_outputs([e], [np.ones((3, 2), np.float32)], rtol=0, atol=0)
    with pytest.raises(ExportMismatch, match="2 outputs"):
        export_mod.compare_outputs([e], [e, e], rtol=0, atol=0)
    bad = e.copy()
    bad[1, 0] = np.nan
    with pytest.raises(ExportMismatch, match=r"inf at index \(1, 0\)"):
        export_mod.compare_outputs([e], [bad], rtol=1e-4, atol=1e-5)
    both = np.array([np.nan, 1.0])
    assert export_mod.compare_outputs([both], [both.copy()], rtol=0, atol=0) == 0.0


def test_export_mismatch_end_to_end(tmp_path, monkeypatch):
    real_run = export_mod._run_onnx

    def perturbed(session, names, args):
        outs = real_run(session, names, args)
        if args[0].shape[0] == 3:  # only the second (batch 3) check disagrees
            outs[0] = outs[0].copy()
            outs[0][1, 2] += 0.5
        return outs

    monkeypatch.setattr(export_mod, "_run_onnx", perturbed)
    with pytest.raises(ExportMismatch) as info:
        export_onnx(TinyResBlock(), torch.randn(1, 3, 8, 8), tmp_path / "mm.onnx")
    assert info.value.output_index == 0 and info.value.index == (1, 2) and info.value.batch_size == 3
    assert re.search(r"largest \|onnx - torch\| = 0\.5\d* at index \(1, 2\)", str(info.value))


def test_checker_failure(tmp_path, monkeypatch):
    def broken_exporter(exporter, module, args, path, *rest):
        node = onnx.helper.make_node("Relu", ["nowhere"], ["output"])  # input never defined
        graph = onnx.helper.make_graph(
            [node], "broken",
            [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 3, 8, 8])],
            [onnx.helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["batch", 3, 8, 8])])
        onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(path))

    monkeypatch.setattr(export_mod, "_run_exporter", broken_exporter)
    with pytest.raises(ExportError, match="checker rejected"):
        export_onnx(nn.ReLU(), torch.randn(1, 3, 8, 8), tmp_path / "broken.onnx")


@torch.library.custom_op("passes_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


class CustomOpModel(nn.Module):
    def forward(self, x):
        return _twice(x) + 1


def test_exporter_error_names_op(tmp_path, capfd):
    with pytest.raises(ExportError) as info:
        export_onnx(CustomOpModel(), torch.randn(2, 3), tmp_path / "custom.onnx", exporter="torchscript")
    assert info.value.op == "passes_test::twice" and "passes_test::twice" in str(info.value)
    assert not isinstance(info.value, ExportMismatch)
    with pytest.raises(ExportError) as info:  # auto: both exporters fail, both reported
        export_onnx(CustomOpModel(), torch.randn(2, 3), tmp_path / "custom.onnx")
    assert info.value.op == "passes_test::twice"
    assert "torchscript exporter" in str(info.value) and "dynamo exporter" in str(info.value)
    out, err = capfd.readouterr()
    assert "Torch IR graph" not in out + err and "[torch.onnx]" not in out + err  # exporter noise silenced


# --------------------------------------------------------------------------- latency


@pytest.fixture(scope="module")
def res_onnx(tmp_path_factory):
    return export_onnx(TinyResBlock(), torch.randn(1, 3, 16, 16), tmp_path_factory.mktemp("lat") / "res.onnx").path


def test_latency_sane(res_onnx):
    lat = latency(res_onnx, warmup=2, repeats=15)
    assert isinstance(lat, Latency)
    assert lat.repeats == 15 and lat.threads == 1 and lat.batch_size == 1
    assert "CPUExecutionProvider" in lat.providers
    assert 0 < lat.p10_ms <= lat.median_ms <= lat.p90_ms < 1000
    assert lat.mean_ms > 0 and lat.std_ms >= 0
    assert lat.input_shapes == ((1, 3, 16, 16),)
    assert re.fullmatch(r"[\d.]+ ms \(p10 [\d.]+, p90 [\d.]+; 15 runs, 1 thread, batch 1\)", str(lat))


def test_latency_threads_batch_and_shapes(res_onnx):
    lat = latency(res_onnx, batch_size=4, threads=2, warmup=1, repeats=5)
    assert lat.threads == 2 and lat.batch_size == 4 and lat.input_shapes == ((4, 3, 16, 16),)
    assert str(lat).endswith("5 runs, 2 threads, batch 4)")
    lat = latency(res_onnx, input_shapes={"input": (2, 3, 16, 16)}, warmup=0, repeats=3)
    assert lat.batch_size == 2 and lat.input_shapes == ((2, 3, 16, 16),)
    lat = latency(res_onnx, input_shapes=[(1, 3, 16, 16)], warmup=0, repeats=2, min_time_s=0.05)
    assert lat.repeats >= 2 and lat.repeats * lat.mean_ms >= 40  # ran until ~50 ms accumulated


def test_latency_errors(res_onnx, tmp_path):
    with pytest.raises(ValueError, match="threads"):
        latency(res_onnx, threads=0)
    with pytest.raises(ValueError, match="unknown inputs"):
        latency(res_onnx, input_shapes={"x": (1, 3, 8, 8)})
    static = export_onnx(TinyResBlock(), torch.randn(1, 3, 8, 8), tmp_path / "s.onnx", dynamic_batch=False).path
    with pytest.raises(ValueError, match="fixed batch dimension of 1"):
        latency(static, batch_size=2)


@pytest.mark.parametrize("text, ms", [
    ("4ms", 4.0), ("4 ms", 4.0), ("0.5s", 500.0), ("800us", 0.8), ("4", 4.0), (" 2.5 MS ", 2.5),
    ("800µs", 0.8), ("1e-3s", 1.0), (".5ms", 0.5), (3, 3.0), (0.25, 0.25),
])
def test_parse_latency(text, ms):
    assert parse_latency(text) == pytest.approx(ms)


@pytest.mark.parametrize("text", ["", "fast", "4 minutes", "ms", "-4ms", "0", "0ms", "4 m s", "4ms5", "inf", None,
                                  True, float("nan")])
def test_parse_latency_rejects(text):
    with pytest.raises(ValueError, match="cannot parse latency"):
        parse_latency(text)


# --------------------------------------------------------------------------- portable save


def test_save_load_portable_without_model_code(tmp_path):
    class LocalNet(nn.Module):  # defined here: unreachable by name from any other process
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.bn = nn.BatchNorm2d(6)
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            a, b = F.relu(self.bn(self.conv(x))).split(3, 1)
            x = channel_shuffle(torch.cat([b, a], 1), 2)
            return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    model = LocalNet().eval()
    model.bn.running_var.fill_(2.0)
    x1, x3 = torch.randn(1, 3, 8, 8), torch.randn(3, 3, 8, 8)
    info = save_portable(model, (x1,), tmp_path / "net.pt2")
    assert info.dynamic_batch and info.note == "" and info.file_size > 0 and info.max_abs_diff < 1e-5
    with torch.no_grad():
        torch.save({"x1": x1, "x3": x3, "y1": model(x1), "y3": model(x3)}, tmp_path / "io.pt")
    torch.testing.assert_close(load_portable(info.path)(x3), model(x3).detach())

    script = textwrap.dedent("""
        import sys, torch
        from graphsearch.passes import load_portable
        m = load_portable(sys.argv[1])
        io = torch.load(sys.argv[2])
        torch.testing.assert_close(m(io["x1"]), io["y1"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m(io["x3"]), io["y3"], rtol=1e-5, atol=1e-6)
        assert not [k for k in sys.modules if "test_export" in k or k.startswith("tests")], "model code imported"
        print("LOADED-OK")
    """)
    # only the directory holding the `graphsearch` package goes on the path, never tests/
    env = {**os.environ, "PYTHONPATH": str(Path(graphsearch.__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-c", script, str(info.path), str(tmp_path / "io.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED-OK" in proc.stdout


def test_save_portable_static_fallback(tmp_path):
    class BatchBaked(nn.Module):
        def forward(self, x):
            return x.reshape(1, 4).sum(1)  # only valid for batch 1: dynamic export must fail

    info = save_portable(BatchBaked(), torch.randn(1, 4), tmp_path / "baked.pt2")
    assert not info.dynamic_batch and "static" in info.note and "dynamic batch export failed" in info.note
    x = torch.randn(1, 4)
    torch.testing.assert_close(load_portable(info.path)(x), x.sum().reshape(1))


def test_public_names():
    for name in ["slim", "mask", "verify", "export_onnx", "ExportMismatch", "ExportError", "latency", "Latency", "parse_latency",
                 "save_portable", "load_portable"]:
        assert hasattr(passes, name), name
