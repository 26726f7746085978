"""GPU timing helpers shared by the benchmarks: CUDA-graph replay over rotating operands, and do_bench."""

from __future__ import annotations

import statistics
from typing import Callable

import torch

L2_DEFEAT_BYTES = 160 * 2**20  # rotate through this many bytes of operands so no call finds its weight in L2


def copies_to_defeat_l2(bytes_per_copy: int, max_copies: int = 16) -> int:
    """How many operand copies a rotation needs so consecutive calls of one layer miss in L2."""
    return max(1, min(max_copies, -(-L2_DEFEAT_BYTES // max(bytes_per_copy, 1))))


def graph_time_us(calls: list[Callable[[], object]], repeats: int = 3, replays: int = 10) -> float:
    """Median time per call (µs) of `calls` captured back to back in one CUDA graph.

    Each entry of `calls` uses its own operand copy (see `copies_to_defeat_l2`), so the replay measures
    HBM-bound behaviour rather than L2 hits; launch overhead is the graph's (about 1 µs per kernel).
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up (also runs any autotuning) outside the capture
            for fn in calls:
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    seq = calls * repeats
    with torch.cuda.graph(graph):
        for fn in seq:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(seq))
    del graph
    return statistics.median(times)


def eager_time_us(fn: Callable[[], object]) -> float:
    """`triton.testing.do_bench` median (µs): eager launches, L2 flushed between calls."""
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1000


def env_info() -> dict[str, str]:
    import platform

    import transformers
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "device": props.name,
        "sms": str(props.multi_processor_count),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "cuda": str(torch.version.cuda),
        "python": platform.python_version(),
    }
