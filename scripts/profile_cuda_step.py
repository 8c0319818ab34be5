"""Where a Helix decode step's time goes on a CUDA GPU: the host's cost per kernel launch, per device sync and per
small host-to-device copy (eager, and per kernel inside a replayed CUDA graph), then a profile of plain decoding
(K=0, batch 1) on a TinyLlama-1.1B-shaped random target: wall time per step against the kernels' own device time.

    python scripts/profile_cuda_step.py
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_scale import SHAPES, build_pair, timed

from helix_serve.config import EngineConfig
from helix_serve.engine.llm_engine import LLMEngine


def per_call_us(fn, calls: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def host_costs(calls: int = 2000) -> dict:
    x = torch.zeros(1, device="cuda")
    eager = per_call_us(lambda: x.add_(1), calls)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x.add_(1)  # warm-up off the default stream, as capture wants
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        for _ in range(calls):
            x.add_(1)
    replay = per_call_us(graph.replay, 5) / calls
    sync = per_call_us(lambda: x.item(), 200)
    h2d = per_call_us(lambda: torch.tensor([1, 2, 3], device="cuda"), 200)
    return {"launch_us": eager, "graph_kernel_us": replay, "item_sync_us": sync, "small_h2d_us": h2d}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    costs = host_costs()
    print("host costs (µs): " + ", ".join(f"{k} {v:.1f}" for k, v in costs.items()), flush=True)
    pair = build_pair({"target": SHAPES["target"], "draft": SHAPES["draft"]}, torch.bfloat16, "cuda", 32000)
    engine = LLMEngine(EngineConfig(device="cuda", num_kv_blocks=256), pair=pair)
    prompt = list(range(1, 33))
    timed(engine, prompt, 8, speculative=False)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        seconds, out = timed(engine, prompt, args.tokens, speculative=False)
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    device_us = sum(e.self_device_time_total for e in events)
    steps = out.stats["num_target_steps"]
    print(f"K=0 batch 1, {args.tokens} tokens: {seconds / steps * 1e3:.2f} ms a step (profiled), kernels' device time "
          f"{device_us / steps / 1e3:.2f} ms a step, {launches / steps:.0f} launches a step")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
