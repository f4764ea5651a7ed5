"""``triton_launch.launch`` launches what ``fn[grid](...)`` would: a bound kernel is reused only where Triton would
reuse it (same dtypes, 16-byte alignment, integer classes, constexprs and options), with this call's tensors,
integers and stream; launch hooks and callable grids take Triton's own path.  Skipped without CUDA or Triton."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from moe_passes.kernels import triton_launch  # noqa: E402
from moe_passes.kernels.triton_launch import arg_key, launch  # noqa: E402

binds = pytest.mark.skipif(triton_launch.JITFunction is None, reason="this Triton release launches through fn[grid]")


@triton.jit
def _axpy(x_ptr, y_ptr, n, a, out_ptr=None, SCALE: tl.constexpr = 1, BLOCK: tl.constexpr = 1024):
    """out = SCALE * (a * x + y) + n over ``n`` elements (``out_ptr`` None: into ``y``)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    v = SCALE * (a * tl.load(x_ptr + offs, mask=ok) + tl.load(y_ptr + offs, mask=ok)) + n
    if out_ptr is None:
        tl.store(y_ptr + offs, v, mask=ok)
    else:
        tl.store(out_ptr + offs, v, mask=ok)


def _expect(x, y, n, a, scale=1):
    return scale * (a * x[:n].double() + y[:n].double()) + n


@binds
def test_rebinds_where_triton_specializes_and_reuses_with_this_calls_values():
    triton_launch._KERNELS.pop(_axpy, None)  # the other tests' bindings would be reused below
    g = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    base = torch.randn(4200, device="cuda", generator=g)
    other = torch.randn(4200, device="cuda", generator=g)
    seen = []
    # aligned / misaligned pointers, n == 1, a multiple of 16 or not, a keyword output, a constexpr (int, then an
    # equal float), fp16 data;
    # the repeats must reuse a binding with their own tensors and scalars
    cases = [dict(off=0, n=4096), dict(off=0, n=4096), dict(off=1, n=4096), dict(off=0, n=1), dict(off=0, n=17),
             dict(off=3, n=33, out=True), dict(off=3, n=49, out=True), dict(off=0, n=4096, scale=3),
             dict(off=0, n=4096, scale=3.0), dict(off=0, n=4096, half=True), dict(off=1, n=4000)]
    for case in cases:
        off, n = case["off"], case["n"]
        x, y = base[off:off + n], other[off:off + n].clone()
        if case.get("half"):
            x, y = x.half(), y.half()
        a = float(torch.rand((), generator=g, device="cuda"))
        want = _expect(x, y, n, a, case.get("scale", 1))
        kw = {}
        if case.get("out"):
            kw["out_ptr"] = out = torch.empty_like(y)
        if "scale" in case:
            kw["SCALE"] = case["scale"]
        launch(_axpy, (triton.cdiv(n, 1024),), x, y, n, a, **kw)
        got = out if case.get("out") else y
        torch.testing.assert_close(got.double(), want, rtol=2e-3 if case.get("half") else 1e-6, atol=1e-3)
        seen.append(len(triton_launch._KERNELS[_axpy].bound))
    assert seen == [1, 1, 2, 3, 4, 5, 5, 6, 7, 8, 8], seen


@binds
def test_a_bound_launch_skips_tritons_front_end(monkeypatch):
    x = torch.randn(2048, device="cuda")
    y = torch.zeros_like(x)
    launch(_axpy, (2,), x, y, 2048, 1.0)  # binds
    monkeypatch.setattr(type(_axpy), "run", lambda *a, **k: pytest.fail("took Triton's JIT path"))
    y.zero_()
    launch(_axpy, (2,), x, y, 2048, 3.0)
    torch.testing.assert_close(y, 3 * x + 2048)


def test_follows_the_current_stream():
    x = torch.randn(1 << 20, device="cuda")
    y = torch.zeros_like(x)
    launch(_axpy, (1024,), x, y, x.numel(), 1.0)  # binds
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        y.fill_(7.0)
        # on the side stream this runs after the fill; on any other it would run first and the fill would win
        launch(_axpy, (1024,), x, y, x.numel(), 2.0)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(y, 2 * x + 7 + x.numel())


def test_launch_hooks_and_callable_grids_take_tritons_path():
    from triton import knobs

    x = torch.randn(300, device="cuda")
    y = torch.zeros_like(x)
    launch(_axpy, (1,), x, y, 300, 1.0)  # binds
    calls = []

    def hook(metadata):
        calls.append(metadata)

    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):  # Triton >= 3.5: a chain of hooks
        chain.add(hook)
    else:
        knobs.runtime.launch_enter_hook = hook
    try:
        launch(_axpy, (1,), x, y, 300, 1.0)
    finally:
        if hasattr(chain, "remove"):
            chain.remove(hook)
        else:
            knobs.runtime.launch_enter_hook = chain
    assert len(calls) == 1
    y.zero_()
    launch(_axpy, lambda meta: (triton.cdiv(300, meta["BLOCK"]),), x, y, 300, 1.0)
    torch.testing.assert_close(y, x + 300)


@binds
def test_keys_agree_with_tritons_specialization():
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    def spec(v):
        return native_specialize_impl(BaseBackend, v, False, True, True)

    ints = [1, 2, 16, 17, 32, -16, -3, 2**31 - 16, 2**31, 2**40, -2**31, -2**31 - 16, 2**63, 2**64 - 16]
    for a in ints:
        for b in ints:
            assert (arg_key(a) == arg_key(b)) == (spec(a) == spec(b)), (a, b, spec(a), spec(b))
    t = torch.empty(64, device="cuda")
    views = (t, t[1:], t[4:], t.half(), t.half()[8:], t.half()[1:])
    for u in views:
        for v in views:
            assert (arg_key(u) == arg_key(v)) == (spec(u) == spec(v))
