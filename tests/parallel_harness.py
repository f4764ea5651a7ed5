"""Spawn one process group per test module and run the named cases of ``parallel_cases`` in it."""

from __future__ import annotations

import os

import torch

import parallel_cases

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_group(tmp_dir: str, world: int, backend: str, device: str, names) -> dict:
    """``{case: (status, message)}`` as rank 0 saw it, with every other rank's failure appended."""
    import torch.multiprocessing as mp

    # Spawned ranks must import this worktree's moe_passes (and this directory's parallel_cases).
    path = os.pathsep.join([REPO, os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH", "")])
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = path
    try:
        mp.spawn(parallel_cases.run_cases, nprocs=world, join=True,
                 args=(world, backend, device, os.path.join(tmp_dir, "init"), tmp_dir, list(names)))
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    results = {}
    for rank in range(world):
        for name, (status, message) in torch.load(os.path.join(tmp_dir, f"rank{rank}.pt")).items():
            prev = results.get(name, ("ok", ""))
            if status != "ok":
                results[name] = ("fail", f"{prev[1]}\n--- rank {rank} ---\n{message}")
            elif rank == 0:
                results[name] = (status, message)
    return results


def check(results: dict, name: str) -> None:
    status, message = results[name]
    assert status == "ok", message
    print(f"{name}: {message}")
