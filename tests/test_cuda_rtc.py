"""The disk cache of NVRTC cubins (``cuda_rtc.cached_cubin``), on the CPU: NVRTC itself is replaced by a
counting stand-in, so what is checked is the cache's keying, its directory and its failure paths."""

from __future__ import annotations

import os

import pytest

from moe_passes.kernels import cuda_rtc


@pytest.fixture
def nvrtc(monkeypatch, tmp_path):
    """A stand-in compiler whose output names its inputs, calls counted; the cache under ``tmp_path``."""
    calls = []

    def compile_(source, name, arch, options):
        calls.append((source, name, arch, tuple(options)))
        return repr((source, name, arch, tuple(options))).encode()

    monkeypatch.setattr(cuda_rtc, "_nvrtc_cubin", compile_)
    monkeypatch.setattr(cuda_rtc, "_nvrtc_version", lambda: (13, 0))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    return calls


def test_a_second_compile_of_the_same_kernel_reads_the_disk(nvrtc, tmp_path):
    first, from_disk = cuda_rtc.cached_cubin("__global__ void k() {}", "k", "sm_90", ["-O3"])
    assert not from_disk and len(nvrtc) == 1
    again, from_disk = cuda_rtc.cached_cubin("__global__ void k() {}", "k", "sm_90", ["-O3"])
    assert from_disk and again == first and len(nvrtc) == 1
    files = os.listdir(tmp_path / "inductor" / "moe_nvfp4_cubin")
    assert len(files) == 1 and files[0].startswith("k-") and files[0].endswith(".cubin")


@pytest.mark.parametrize("change", ["source", "name", "arch", "options", "nvrtc"])
def test_everything_that_decides_the_cubin_is_in_the_key(nvrtc, monkeypatch, change):
    args = {"source": "__global__ void k() {}", "name": "k", "arch": "sm_90", "options": ("-O3",)}
    cuda_rtc.cached_cubin(**args)
    if change == "nvrtc":
        monkeypatch.setattr(cuda_rtc, "_nvrtc_version", lambda: (13, 1))
    else:
        args[change] = {"source": "__global__ void k() { }", "name": "k2", "arch": "sm_100",
                        "options": ("-O2",)}[change]
    cubin, from_disk = cuda_rtc.cached_cubin(**args)
    assert not from_disk and len(nvrtc) == 2
    assert cubin == repr((args["source"], args["name"], args["arch"], tuple(args["options"]))).encode()


def test_inductors_switch_turns_the_cache_off(nvrtc, tmp_path):
    from torch._inductor import config

    with config.patch(force_disable_caches=True):
        for _ in range(2):
            assert not cuda_rtc.cached_cubin("src", "k", "sm_90")[1]
    assert len(nvrtc) == 2
    assert not (tmp_path / "inductor" / "moe_nvfp4_cubin").exists()


def test_a_cache_that_cannot_be_written_only_costs_the_compile(nvrtc, tmp_path, monkeypatch):
    blocked = tmp_path / "inductor"
    blocked.mkdir()
    (blocked / "moe_nvfp4_cubin").write_text("a file where the directory would be")
    for _ in range(2):
        cubin, from_disk = cuda_rtc.cached_cubin("src", "k", "sm_90")
        assert not from_disk and cubin == repr(("src", "k", "sm_90", ())).encode()
    assert len(nvrtc) == 2
