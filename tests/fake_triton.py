"""A stand-in ``triton`` for checking launches on a CPU: ``@triton.jit`` kernels become recorders, and each
``kernel[grid](...)`` must bind to the kernel's Python signature and have a valid grid.  Nothing runs: it
catches wrong, missing or extra launch arguments where no GPU is (tests/test_triton_launch_args.py)."""
import inspect
import sys
import types

LAUNCH_OPTIONS = {"num_warps", "num_stages", "launch_pdl"}
CALLS = []


class FakeKernel:
    def __init__(self, fn):
        self.fn = fn
        self.sig = inspect.signature(fn)
        self.__name__ = fn.__name__

    def __getitem__(self, grid):
        assert isinstance(grid, tuple) and grid and all(isinstance(g, int) and g >= 0 for g in grid), \
            (self.__name__, grid)
        assert grid[0] <= 2**31 - 1 and all(g <= 65535 for g in grid[1:]), (self.__name__, grid)

        def launch(*args, **kwargs):
            opts = {k: kwargs.pop(k) for k in list(kwargs) if k in LAUNCH_OPTIONS}
            bound = self.sig.bind(*args, **kwargs)  # TypeError on a bad launch
            assert set(opts) >= {"num_warps"}, (self.__name__, opts)
            CALLS.append((self.__name__, grid, dict(bound.arguments), opts))
        return launch

    def __call__(self, *a, **k):
        raise AssertionError("a jit function called from Python")


class _Any:
    def __call__(self, *a, **k):
        return _Any()

    def __getattr__(self, name):
        return _Any()


def install():
    """Put the stand-in into ``sys.modules`` (after torch and its inductor are imported: they probe triton)."""
    triton = types.ModuleType("triton")
    triton.jit = lambda fn=None, **kw: FakeKernel(fn) if fn is not None else (lambda f: FakeKernel(f))
    triton.cdiv = lambda a, b: -(-a // b)
    tl = types.ModuleType("triton.language")
    def _attr(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Any()
    tl.__getattr__ = _attr
    extra = types.ModuleType("triton.language.extra")
    cuda = types.ModuleType("triton.language.extra.cuda")
    cuda.gdc_wait = FakeKernel(lambda: None)
    cuda.gdc_launch_dependents = FakeKernel(lambda: None)
    triton.language = tl
    tl.extra = extra
    extra.cuda = cuda
    sys.modules.update({"triton": triton, "triton.language": tl, "triton.language.extra": extra,
                        "triton.language.extra.cuda": cuda})
