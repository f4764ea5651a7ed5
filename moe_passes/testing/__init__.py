"""moe_passes.testing: test graph passes written for the moe_nvfp4 backend.

Trace a model to the ATen graph the backend's passes see, run one pass or the whole pipeline on it with
copies of the graph before and after, count ops, assert node chains such as
``pad -> trtllm_nvfp4_moe -> slice -> add``, run the verifier, compare compiled against eager and the
reference.  Hypothesis strategies for MoE problems live in ``moe_passes.testing.strategies`` (imported
on demand: hypothesis is a test dependency).  See docs/testing.md.
"""

from moe_passes.testing.capture import (CompileRecord, GraphChecks, PassRun, RecordingBackend, Snapshot,
                                        copy_graph_module, count_kernel_calls, expect_shape_error, mark_token_dims,
                                        no_silent_fallback, raises_compile_error, run_passes, run_pipeline, trace,
                                        unwrap_compile_error, verify)
from moe_passes.testing.graph import (ALIASES, OpMatcher, assert_no_ops, assert_pattern, find_nodes, format_graph,
                                      format_node, op_count, resolve_op)
from moe_passes.testing.numerics import (BF16_ROUNDING, REFERENCE_TOLERANCE, NumericsReport, Tolerance, assert_close,
                                         check_numerics, compare)
from moe_passes.testing.problems import MoEBlock, MoEProblem, SharedMLP, moe_reference

__all__ = [
    # tracing and running passes
    "trace", "run_passes", "run_pipeline", "PassRun", "RecordingBackend", "CompileRecord", "Snapshot", "GraphChecks",
    "copy_graph_module",
    # graph assertions
    "op_count", "find_nodes", "assert_pattern", "assert_no_ops", "resolve_op", "OpMatcher", "ALIASES",
    "format_graph", "format_node",
    # verification and errors
    "verify", "expect_shape_error", "unwrap_compile_error", "raises_compile_error", "count_kernel_calls",
    "no_silent_fallback", "mark_token_dims",
    # numerics
    "check_numerics", "assert_close", "compare", "Tolerance", "BF16_ROUNDING", "REFERENCE_TOLERANCE", "NumericsReport",
    # problems
    "MoEProblem", "MoEBlock", "SharedMLP", "moe_reference",
]
