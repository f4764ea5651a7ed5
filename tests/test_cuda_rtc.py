"""The disk cache of NVRTC cubins (``cuda_rtc.cached_cubin``), on the CPU: NVRTC itself is replaced by a
counting stand-in, so what is checked is the cache's keying, its directory and its failure paths.  Then the
driver's memory clock and bus width query and the planner's DRAM rate from it, through a stand-in driver."""

from __future__ import annotations

import os
import random
import types

import pytest
import torch

from moe_passes.kernels import cuda_rtc, triton_moe


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


class _FakeDriver:
    """The driver entry points ``memory_clock_and_bus`` calls, answering with ``attrs`` (attribute -> value) for
    device 0."""

    def __init__(self, attrs, fail=None):
        self.attrs, self.fail, self.asked = attrs, fail, []

    def cuInit(self, flags):
        return 3 if self.fail == "init" else 0  # CUDA_ERROR_NOT_INITIALIZED

    def cuDeviceGet(self, dev, index):
        if index != 0:
            return 101  # CUDA_ERROR_INVALID_DEVICE
        dev._obj.value = 0
        return 0

    def cuDeviceGetAttribute(self, out, attr, dev):
        self.asked.append(attr)
        if attr not in self.attrs:
            return 1
        out._obj.value = self.attrs[attr]
        return 0


@pytest.mark.parametrize("clock_khz, bus_bits", [(2619000, 5120), (3201000, 6144), (1215000, 5120)])
def test_the_driver_reports_the_memory_clock_and_bus(monkeypatch, clock_khz, bus_bits):
    clock_khz += random.Random(clock_khz).randrange(1000)  # off the round figures
    fake = _FakeDriver({36: clock_khz, 37: bus_bits})
    monkeypatch.setattr(cuda_rtc, "_driver", lambda: fake)
    assert cuda_rtc.memory_clock_and_bus(0) == (clock_khz, bus_bits)
    assert sorted(fake.asked) == [36, 37]


@pytest.mark.parametrize("case", ["no device", "init", "no clock"])
def test_a_driver_that_refuses_reports_nothing(monkeypatch, case):
    attrs = {36: 2619000, 37: 5120}
    if case == "no clock":
        del attrs[36]
    fake = _FakeDriver(attrs, fail="init" if case == "init" else None)
    monkeypatch.setattr(cuda_rtc, "_driver", lambda: fake)
    assert cuda_rtc.memory_clock_and_bus(1 if case == "no device" else 0) is None


@pytest.mark.parametrize("source", ["torch", "driver", "neither"])
def test_the_planners_dram_rate_is_two_transfers_a_clock_over_the_bus(monkeypatch, source):
    """``triton_moe.dram_rate``: torch's memory clock and bus width where it reports them, else the driver's."""
    rng = random.Random(source)
    clock_khz, bus_bits = rng.randrange(1_000_000, 4_000_000), rng.choice([4096, 5120, 6144])
    props = types.SimpleNamespace(memory_clock_rate=clock_khz if source == "torch" else 0, memory_bus_width=bus_bits)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    driver = {"driver": (clock_khz, bus_bits), "torch": None, "neither": None}[source]
    monkeypatch.setattr(cuda_rtc, "memory_clock_and_bus", lambda index: driver)
    rate = triton_moe.dram_rate(0)
    if source == "neither":
        assert rate is None
    else:
        assert rate == pytest.approx(2 * clock_khz * 1e3 * bus_bits / 8, rel=1e-12)
