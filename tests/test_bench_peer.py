"""``moe-nvfp4 bench``'s peer, read-bandwidth floor, token sweep and split-run JSON, on the CPU.

The timing needs a GPU (the last test); ``triton_kernels`` itself is exercised where ``MOE_PEER_PATH`` names a
folder holding its source (e.g. a copy of ``shared/peers/triton_kernels_src``) and Triton imports.
"""

import itertools
import json
import math
import os
import sys

import pytest
import torch

from moe_passes import bench, bench_peer
from moe_passes.kernels.reference import apply_activation


# ---------------------------------------------------------------------------------------------------- arguments
def test_sweep_and_token_lists():
    assert bench.token_list("sweep") == list(bench.SWEEP_TOKENS)
    assert bench.SWEEP_TOKENS == (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096)
    assert bench.token_list("4096,1, 16") == [4096, 1, 16]
    opts = bench.build_parser().parse_args(["--tokens", "sweep", "--shapes", "deepseek-v3", "--budget-s", "500",
                                            "--peer-path", "/x", "--check", "ends", "--no-peer"])
    assert opts.tokens == list(bench.SWEEP_TOKENS) and opts.shapes == ["deepseek-v3"]
    assert opts.budget_s == 500 and opts.peer_path == "/x" and opts.check == "ends"
    assert opts.no_grouped_mm and not opts.no_tk_peer  # --no-peer keeps its old meaning: the bf16 layer


@pytest.mark.parametrize("bad", ["0", "1,-4", "a,b", ",", "16;32"])
def test_bad_token_lists_are_refused(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--tokens", bad])
    assert exc.value.code == 2
    assert "positive token counts" in capsys.readouterr().err


def test_unknown_check_mode_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--check", "some"])
    assert "invalid choice" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- the floor
@pytest.mark.parametrize("name", list(bench.SHAPES))
@pytest.mark.parametrize("tokens", [1, 24, 4096])
def test_floors_use_the_read_bandwidth(name, tokens):
    h, i, e, k, activation, _, _ = bench.SHAPES[name]
    # bytes per expert from the formats' tensors: codes K/2 per row, one scale byte per 16 (NVFP4) or 32 (MXFP4)
    mats = [(2 * i if activation != "relu2" else i, h), (h, i)]  # (rows, K) of w13 and w2
    nv_bytes = sum(rows * (kk // 2 + kk // 16) for rows, kk in mats)
    mx_bytes = sum(rows * (kk // 2 + kk // 32) for rows, kk in mats)
    # an expert escapes one token with probability C(E-1, k) / C(E, k)
    touched = e * (1 - (math.comb(e - 1, k) / math.comb(e, k)) ** tokens)
    read, copy = 3.1e12, 2.6e12
    floors = bench.row_floors(name, tokens, read, copy)
    assert floors["floor_us"] == pytest.approx(touched * nv_bytes / read * 1e6, rel=1e-9)
    assert floors["floor_copy_us"] == pytest.approx(touched * nv_bytes / copy * 1e6, rel=1e-9)
    assert floors["floor_mxfp4_us"] == pytest.approx(touched * mx_bytes / read * 1e6, rel=1e-9)
    assert floors["floor_us"] < floors["floor_copy_us"]  # a faster stream, a lower floor


@pytest.mark.parametrize("name", list(bench.SHAPES))
def test_floor_counts_the_experts_the_inputs_touch(name):
    h, i, e, k, activation, routing, extra = bench.SHAPES[name]
    logits = [torch.randn(24, e) for _ in range(3)]
    bias = torch.randn(e) / 10 if routing == "deepseek_v3" else None
    touched = bench.touched_experts(name, logits, bias)
    # independent count: the k best biased scores per token, the group limit applied by hand
    counts = []
    for lg in logits:
        score = lg.double().sigmoid() + bias.double() if routing == "deepseek_v3" else lg.double()
        groups = extra.get("n_group") or 1
        if groups > 1:
            per = score.view(24, groups, -1)
            best = per.sort(-1, descending=True).values[..., :2].sum(-1)
            keep = best.argsort(-1, descending=True)[:, :extra["topk_group"]]
            allowed = torch.zeros(24, groups, dtype=torch.bool).scatter(1, keep, True)
            score = score.masked_fill(~allowed.repeat_interleave(e // groups, 1), -math.inf)
        counts.append(len({int(x) for row in score.argsort(-1, descending=True)[:, :k] for x in row}))
    assert touched == pytest.approx(sum(counts) / 3)
    floors = bench.row_floors(name, 24, 3e12, 2e12, touched)
    uniform = bench.row_floors(name, 24, 3e12, 2e12)
    assert floors["experts_touched"] == touched and floors["experts_touched_uniform"] == uniform["experts_touched"]
    for key in ("floor_us", "floor_copy_us", "floor_mxfp4_us"):
        assert floors[key] == pytest.approx(uniform[key] * touched / uniform["experts_touched"], rel=1e-12)
    # without a measured copy bandwidth (ab_decode.py) the copy floor is left out, the others are the same
    read_only = bench.row_floors(name, 24, 3e12, touched=touched)
    assert "floor_copy_us" not in read_only
    assert read_only == {key: v for key, v in floors.items() if key != "floor_copy_us"}


@pytest.mark.parametrize("name", list(bench.SHAPES))
def test_useful_flops_and_their_share_of_the_bf16_peak(name):
    h, i, e, k, activation, _, _ = bench.SHAPES[name]
    tokens = int(torch.randint(1, 5000, ()).item())
    # every token's k experts: a [1, H] x [H, N] product per weight matrix, 2 FLOPs a multiply-add
    shapes = ([(h, 2 * i)] if activation != "relu2" else [(h, i)]) + [(i, h)]
    flops = sum(2 * tokens * k * a * b for a, b in shapes)
    assert bench.useful_flops(name, tokens) == pytest.approx(flops, rel=1e-12)
    row = bench.add_ratios(dict(floor_us=1.0, floor_mxfp4_us=1.0, triton_us=250.0, peer_us=500.0,
                                useful_tflop=flops / 1e12, bf16_peak_TFLOPs=800.0))
    assert row["triton_TFLOPs"] == pytest.approx(flops / 250e-6 / 1e12)
    assert row["triton_over_bf16_peak"] == pytest.approx(flops / 250e-6 / 800e12)
    assert row["peer_over_bf16_peak"] == pytest.approx(row["triton_over_bf16_peak"] / 2)


def test_ratios_are_over_ours_and_over_the_read_floor():
    row = dict(floor_us=50.0, floor_copy_us=60.0, floor_mxfp4_us=47.0, triton_us=100.0, peer_us=130.0,
               peer_experts_us=120.0, grouped_mm_us=400.0)
    bench.add_ratios(row)
    assert row["triton_over_floor"] == pytest.approx(2.0)
    assert row["peer_over_triton"] == pytest.approx(1.3) and row["peer_experts_over_triton"] == pytest.approx(1.2)
    assert row["grouped_mm_over_triton"] == pytest.approx(4.0) == row["speedup_vs_grouped_mm"]
    assert row["peer_over_mxfp4_floor"] == pytest.approx(130 / 47)
    assert row["peer_over_floor"] == pytest.approx(130 / 50)  # what a layer at the NVFP4 floor would read
    lone = bench.add_ratios(dict(floor_us=1.0, floor_mxfp4_us=1.0, triton_us=3.0))
    assert "peer_over_triton" not in lone  # no peer: no column


# ---------------------------------------------------------------------------------------------------- finding the peer
@pytest.fixture
def no_installed_peer(monkeypatch):
    """As if neither triton_kernels nor vllm were installed, whatever this machine has; restores sys.path/modules."""
    real = bench_peer.importlib.util.find_spec
    monkeypatch.setattr(bench_peer.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("triton_kernels", "vllm") else real(name, *a))
    saved_path = list(sys.path)
    yield
    sys.path[:] = saved_path
    for name in [m for m in sys.modules if m == "triton_kernels" or m.startswith("triton_kernels.")]:
        del sys.modules[name]


def test_unavailable_peer_says_why(no_installed_peer, tmp_path):
    module, info = bench_peer.find_triton_kernels(str(tmp_path))
    assert module is None and info["available"] is False
    sources = [a["source"] for a in info["attempts"]]
    assert sources == ["installed triton_kernels", "vllm.third_party.triton_kernels", f"--peer-path {tmp_path}"]
    assert "not installed" in info["reason"] and "holds no triton_kernels" in info["reason"]
    module, info = bench_peer.find_triton_kernels(None)
    assert module is None and "--peer-path: not given" in info["reason"]


def test_peer_source_that_fails_to_import_is_reported_and_forgotten(no_installed_peer, tmp_path):
    pkg = tmp_path / "triton_kernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('needs triton 9')\n")
    module, info = bench_peer.find_triton_kernels(str(tmp_path))
    assert module is None and "needs triton 9" in info["reason"]
    assert "triton_kernels" not in sys.modules


def test_peer_found_from_peer_path(no_installed_peer, tmp_path):
    pkg = tmp_path / "triton_kernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "matmul_ogs.py").write_text("def matmul_ogs(*a, **k):\n    pass\n")
    for given in (tmp_path, pkg):  # the folder holding the package, or the package itself
        for name in [m for m in sys.modules if m.startswith("triton_kernels")]:
            del sys.modules[name]
        module, info = bench_peer.find_triton_kernels(str(given))
        assert module is not None and info["available"] and info["source"] == f"--peer-path {given}"
        assert os.path.dirname(module.__file__) == str(pkg)


def test_vllm_copy_is_found_without_importing_vllm(monkeypatch, tmp_path):
    third = tmp_path / "vllm" / "third_party"
    (third / "triton_kernels").mkdir(parents=True)
    (third / "triton_kernels" / "__init__.py").write_text("")

    class Spec:
        submodule_search_locations = [str(tmp_path / "vllm")]

    monkeypatch.setattr(bench_peer.importlib.util, "find_spec", lambda name, *a: Spec() if name == "vllm" else None)
    assert bench_peer._vllm_third_party() == str(third)


# ---------------------------------------------------------------------------------------------------- plain-torch parts
def _grouped_by_expert(ids, experts):
    """Independent definition: entries t*k+j listed expert by expert, in increasing entry order."""
    flat = ids.reshape(-1).tolist()
    return [n for e in range(experts) for n, x in enumerate(flat) if x == e]


@pytest.mark.parametrize("tokens,k,experts", [(1, 8, 128), (5, 6, 128), (33, 8, 256), (7, 3, 16)])
def test_sorted_routing(tokens, k, experts):
    g = torch.Generator().manual_seed(tokens * k)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    col_sum, col_sorted, row_sorted = bench_peer.sorted_routing(ids, experts)
    assert col_sum.dtype == col_sorted.dtype == row_sorted.dtype == torch.int32
    assert col_sorted.tolist() == _grouped_by_expert(ids, experts)
    assert all(col_sorted[row_sorted[n]] == n for n in range(tokens * k))
    assert col_sum.tolist() == [int((ids == e).sum()) for e in range(experts)]


def test_interleave_pairs_gate_with_up():
    w = torch.arange(2 * 6 * 3).reshape(2, 6, 3)  # 2 experts, I = 3 gate rows then 3 up rows
    inter = bench_peer.interleave_gate_up(w)
    for e, r in itertools.product(range(2), range(3)):
        assert torch.equal(inter[e, 2 * r], w[e, r]) and torch.equal(inter[e, 2 * r + 1], w[e, 3 + r])
    assert torch.equal(bench_peer.deinterleave_gate_up(inter), w)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "relu2"])
def test_reference_moe_against_a_per_token_loop(activation):
    g = torch.Generator().manual_seed(3)
    t, h, i, e, k = 6, 32, 16, 5, 2
    n1 = 2 * i if activation != "relu2" else i
    x = torch.randn(t, h, generator=g).to(torch.bfloat16)
    w13, w2 = torch.randn(e, n1, h, generator=g) / 6, torch.randn(e, h, i, generator=g) / 4
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    wts = torch.rand(t, k, generator=g)
    got = bench_peer.reference_moe(x, ids, wts, lambda n: w13[n], lambda n: w2[n], activation)
    want = torch.zeros(t, h)
    for tok, j in itertools.product(range(t), range(k)):
        ex = int(ids[tok, j])
        mid = apply_activation(w13[ex] @ x[tok].float(), activation).to(torch.bfloat16).float()
        want[tok] += wts[tok, j] * (w2[ex] @ mid)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert bench_peer.rel_err(got, want) < 1e-6 and bench_peer.rel_err(got + 1, want) > 1e-2


def test_rel_err_fails_nan():
    assert not bench_peer.rel_err(torch.full((2, 2), float("nan")), torch.ones(2, 2)) <= 1.0


# ---------------------------------------------------------------------------------------------------- split runs
def _row(shape, tokens, **kw):
    return dict(shape=shape, tokens=tokens, **kw)


def _doc(device, rows, **meta):
    return dict(meta=dict(device=device, **meta), peer=dict(available=True), results=rows)


def test_merge_joins_split_runs_in_shape_order():
    a = _doc("H100", [_row("deepseek-v3", 1, triton_us=1.0), _row("deepseek-v3", 2, skipped="budget")], run="a")
    b = _doc("H100", [_row("qwen3-30b-a3b", 16, triton_us=3.0), _row("deepseek-v3", 2, triton_us=2.0),
                      _row("deepseek-v3", 1, skipped="budget")], run="b")
    merged = bench.merge_runs([a, b])
    keys = [(r["shape"], r["tokens"]) for r in merged["results"]]
    assert keys == [("qwen3-30b-a3b", 16), ("deepseek-v3", 1), ("deepseek-v3", 2)]  # SHAPES order, then tokens
    by = {(r["shape"], r["tokens"]): r for r in merged["results"]}
    assert by[("deepseek-v3", 2)]["triton_us"] == 2.0      # a measured row fills a skipped one
    assert by[("deepseek-v3", 1)]["triton_us"] == 1.0      # a skipped row never replaces a measured one
    assert [m["run"] for m in merged["meta"]["merged_from"]] == ["a", "b"]
    c = _doc("H100", [_row("deepseek-v3", 1, triton_us=0.5)])
    assert {(r["tokens"], r.get("triton_us")) for r in bench.merge_runs([a, c])["results"]} == {(1, 0.5), (2, None)}
    failed = _doc("H100", [_row("deepseek-v3", 1, check="FAIL triton", peer_us=9.0)])  # its layer untimed
    assert bench.merge_runs([a, failed])["results"][0]["triton_us"] == 1.0  # keeps the row that passed
    assert bench.merge_runs([failed, a])["results"][0]["triton_us"] == 1.0


def test_merge_refuses_mixed_devices_and_nothing():
    with pytest.raises(ValueError, match="different devices"):
        bench.merge_runs([_doc("H100", []), _doc("H200", [])])
    with pytest.raises(ValueError):
        bench.merge_runs([])


def test_merge_command(tmp_path, capsys):
    paths = []
    for n, rows in enumerate([[_row("gemma-4-26b-a4b", 8, triton_us=5.0)], [_row("gemma-4-26b-a4b", 4, triton_us=4.0)]]):
        paths.append(tmp_path / f"run{n}.json")
        paths[-1].write_text(json.dumps(_doc("H100", rows)))
    assert bench.main(["--merge", *map(str, paths), "--out", str(tmp_path / "all")]) == 0
    merged = json.loads((tmp_path / "all" / bench.JSON_NAME).read_text())
    assert [r["tokens"] for r in merged["results"]] == [4, 8]
    assert bench.main(["--merge", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- main's flow
class _Props:
    name, multi_processor_count = "Fake GPU", 132


@pytest.fixture
def fake_gpu(monkeypatch):
    """main() on the CPU: bandwidths and the per-shape measurement replaced, everything else real."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *_: _Props())
    monkeypatch.setattr(bench, "measure_copy_bandwidth", lambda: 2.0e12)
    monkeypatch.setattr(bench, "measure_read_bandwidth", lambda nbytes: 3.0e12)
    monkeypatch.setattr(bench, "measure_bf16_peak", lambda: 700e12)
    calls = []

    def fake_measure(name, tokens, read_bw, copy_bw, settings, emit, note):
        calls.append((name, settings))
        for t in tokens:
            row = dict(shape=name, tokens=t, **bench.row_floors(name, t, read_bw, copy_bw), triton_us=10.0 * t)
            emit(bench.add_ratios(row))
            bench.time.time()  # the clock moves on with each row

    monkeypatch.setattr(bench, "measure_shape", fake_measure)
    return calls


def test_json_says_why_the_peer_is_absent(fake_gpu, no_installed_peer, tmp_path):
    out = tmp_path / "o"
    assert bench.main(["--shapes", "qwen3-30b-a3b", "--tokens", "1,2", "--out", str(out),
                       "--peer-path", str(tmp_path / "nowhere")]) == 0
    doc = json.loads((out / bench.JSON_NAME).read_text())
    assert doc["peer"]["available"] is False and "nowhere" in doc["peer"]["reason"]
    assert fake_gpu[0][1].tk is None  # nothing tries to time an absent peer
    assert doc["meta"]["read_bandwidth_TBps"] == 3.0 and doc["meta"]["copy_bandwidth_TBps"] == 2.0
    assert doc["meta"]["bf16_peak_TFLOPs"] == 700.0
    assert all("peer_us" not in r and "peer_over_triton" not in r for r in doc["results"])
    floor = bench.floor_seconds(2048, 768, 128, 8, "silu", 2, 3.0e12) * 1e6
    assert doc["results"][1]["floor_us"] == pytest.approx(floor)  # the read bandwidth's floor
    assert bench.main(["--shapes", "qwen3-30b-a3b", "--tokens", "1", "--out", str(out), "--no-tk-peer"]) == 0
    assert "--no-tk-peer" in json.loads((out / bench.JSON_NAME).read_text())["peer"]["reason"]


def test_budget_skips_the_rest_and_says_so(fake_gpu, no_installed_peer, tmp_path, monkeypatch):
    clock = itertools.count(1000.0, 30.0)  # every look at the clock: 30 s later

    class Clock:
        @staticmethod
        def time():
            return next(clock)

    monkeypatch.setattr(bench, "time", Clock)
    out = tmp_path / "o"
    assert bench.main(["--shapes", "qwen3-30b-a3b,deepseek-v3", "--tokens", "1,2,4", "--budget-s", "100",
                       "--out", str(out), "--no-tk-peer"]) == 0
    doc = json.loads((out / bench.JSON_NAME).read_text())
    assert [c[0] for c in fake_gpu] == ["qwen3-30b-a3b"]  # the second shape is past the budget
    skipped = [(r["shape"], r["tokens"]) for r in doc["results"] if "skipped" in r]
    assert skipped == [("deepseek-v3", 1), ("deepseek-v3", 2), ("deepseek-v3", 4)]
    assert doc["meta"]["budget_s"] == 100


def test_format_row_prints_missing_columns_as_dashes():
    line = bench.format_row(bench.add_ratios(dict(shape="qwen3-30b-a3b", tokens=16, floor_us=50.0,
                                                  floor_mxfp4_us=47.0, triton_us=90.0, peer_us=99.0)))
    assert "90.0" in line and "99.0" in line and "1.10" in line and line.count(" -") >= 2
    assert " 1.98 " in line  # p/fl: the peer over the NVFP4 floor
    assert len(line.split()) == len(bench.HEADER.split())  # a value or a dash under every column
    assert "skipped: budget" in bench.format_row(dict(shape="deepseek-v3", tokens=4, skipped="budget"))


# ---------------------------------------------------------------------------------------------------- triton_kernels itself
def _peer_or_skip():
    path = os.environ.get("MOE_PEER_PATH")
    if not path:
        pytest.skip("MOE_PEER_PATH (a folder holding the triton_kernels source) is not set")
    module, info = bench_peer.find_triton_kernels(path)
    if module is None:
        pytest.skip(info["reason"])
    return module


def test_sorted_routing_is_triton_kernels_metadata(monkeypatch):
    _peer_or_skip()
    from triton_kernels.tensor import make_bitmatrix_metadata_torch
    histc = torch.histc  # its torch reference counts int ids with histc, which the CPU does only in float
    monkeypatch.setattr(torch, "histc", lambda x, **kw: histc(x.float(), **kw))
    ids = torch.stack([torch.randperm(128)[:6] for _ in range(37)]).to(torch.int16)
    want = make_bitmatrix_metadata_torch(ids, torch.zeros(37, 128))  # reads only the bitmatrix's width
    col_sum, col_sorted, row_sorted = bench_peer.sorted_routing(ids, 128)
    assert torch.equal(col_sorted.long(), want.col_sorted_indx.long())
    assert torch.equal(row_sorted.long(), want.row_sorted_indx.long())
    assert torch.equal(col_sum, want.col_sum)


def test_layouts_applied_per_expert_chunk_equal_the_whole(monkeypatch):
    _peer_or_skip()
    from triton_kernels.numerics_details.mxfp import downcast_to_mxfp_torch
    from triton_kernels.tensor import FP4, convert_layout, wrap_torch_tensor
    from triton_kernels.tensor_details.layout import HopperMXScaleLayout, HopperMXValueLayout
    monkeypatch.setattr(bench_peer, "_expert_chunks", lambda e, *a, **k: [(n, min(e, n + 2)) for n in range(0, e, 2)])
    q, s = downcast_to_mxfp_torch(torch.randn(5, 256, 512).to(torch.bfloat16), torch.uint8, axis=-1)
    for data, cls, kw, dtype in ((q, HopperMXValueLayout, dict(mx_axis=1), FP4),
                                 (s, HopperMXScaleLayout, dict(mx_axis=1, num_warps=8), None)):
        got = bench_peer._to_layout(data.transpose(1, 2), cls, kw, dtype)
        want = convert_layout(wrap_torch_tensor(data.transpose(1, 2), dtype=dtype), cls, **kw)
        assert torch.equal(got.storage.data, want.storage.data)
        assert got.storage.data.stride() == want.storage.data.stride() and got.shape == want.shape


# ---------------------------------------------------------------------------------------------------- on the GPU
@pytest.mark.gpu
def test_bench_runs_and_checks_on_the_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    argv = ["--shapes", "qwen3-30b-a3b", "--tokens", "1,16", "--out", str(tmp_path), "--read-gib", "1"]
    if os.environ.get("MOE_PEER_PATH"):
        argv += ["--peer-path", os.environ["MOE_PEER_PATH"]]
    assert bench.main(argv) == 0
    doc = json.loads((tmp_path / bench.JSON_NAME).read_text())
    assert doc["meta"]["read_bandwidth_TBps"] > 0
    for row in doc["results"]:
        assert row["check"] == "ok" and row["triton_us"] > 0 and row["err_triton_vs_nvfp4_ref"] < 2e-2
        if doc["peer"]["available"]:
            assert row["peer_us"] > 0 and row["err_peer_vs_mxfp4_ref"] < 2e-2


_EPILOGUE_SCRIPT = '''
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch, triton, triton.language as tl
from moe_passes import bench_peer, bench_peer_act
from moe_passes.kernels.reference import apply_activation

def tile_kernel(fn, red):
    @triton.jit
    def kernel(X, Y, M: tl.constexpr, N: tl.constexpr):
        x = tl.load(X + tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :])
        NO: tl.constexpr = N // red
        tl.store(Y + tl.arange(0, M)[:, None] * NO + tl.arange(0, NO)[None, :], fn(x, 1.0))
    return kernel

worst = 0.0
for activation, (fn, red) in bench_peer_act.EPILOGUES.items():
    h = torch.randn(8, 32)  # GEMM1 output columns as [gate; up]
    cols = bench_peer.interleave_gate_up(h.t()[None])[0].t().contiguous() if red == 2 else h
    y = torch.empty(8, 32 // red)
    tile_kernel(fn, red)[(1,)](cols, y, 8, 32)
    worst = max(worst, float((y - apply_activation(h, activation)).abs().max()))
print("WORST", worst)
'''


def test_epilogues_compute_our_activations_on_interleaved_columns(tmp_path):
    """The jitted epilogues under Triton's interpreter (a subprocess: it must be on before Triton loads)."""
    pytest.importorskip("triton")
    import subprocess
    script = tmp_path / "epilogues.py"
    script.write_text(_EPILOGUE_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert done.returncode == 0, done.stderr[-2000:]
    worst = float(done.stdout.split("WORST")[-1])
    assert worst < 1e-5


def test_peer_reference_weights_are_the_quantized_float_weights(monkeypatch):
    """Interleaving moves whole rows and MXFP4 scales run along a row, so the peer's dequantized expert, back in
    [gate; up] order, is exactly the float expert quantized and dequantized row by row."""
    _peer_or_skip()
    import triton_kernels.numerics_details.mxfp as mxfp
    monkeypatch.setattr(mxfp, "downcast_to_mxfp", mxfp.downcast_to_mxfp_torch)  # the Triton one needs a GPU
    monkeypatch.setattr(bench_peer, "_expert_chunks", lambda e, *a, **k: [(n, min(e, n + 2)) for n in range(0, e, 2)])
    w13, w2 = torch.randn(5, 64, 96).to(torch.bfloat16), torch.randn(5, 96, 32).to(torch.bfloat16)
    layer = bench_peer.PeerLayer(None, None, None, None, None, None, experts=5, top_k=2, routing="renormalize",
                                 gated=True, canonical=(*bench_peer._quantize_mxfp4(w13, interleave=True),
                                                        *bench_peer._quantize_mxfp4(w2, interleave=False)))
    for e in range(5):
        for got, w in ((layer.w13_fp32(e), w13[e]), (layer.w2_fp32(e), w2[e])):
            q, s = mxfp.downcast_to_mxfp_torch(w, torch.uint8, axis=-1)
            assert torch.equal(got, mxfp.upcast_from_mxfp_torch(q, s, torch.float32, axis=-1))
            assert bench_peer.rel_err(got, w) < 0.2  # and that is close to the float weights
