#!/usr/bin/env python3
"""Benchmark the Triton NVFP4 MoE layer on the GPU: see ``moe_passes.bench`` (also ``moe-nvfp4 bench``).

Example: ``python benchmarks/bench_moe.py --out results/ --shapes qwen3-30b-a3b --tokens 1,16,4096``
"""

import sys

from moe_passes.bench import main

if __name__ == "__main__":
    sys.exit(main())
