"""A real CUDA out-of-memory mid-step, not a simulated one (tests/test_engine_lifecycle.py simulates it on CPU).

Runs each prompt alone (the reference), caps this process's share of the GPU at what the allocator reserved for
that, sends the prompts as one batch, whose wider steps need more, and checks that every request ends (preempted
and recomputed, or failed alone with an "out of memory" error) with the reference's tokens, that no KV block leaks,
and that with the cap lifted the batch runs as before. Needs a CUDA device.

    python scripts/check_cuda_oom.py
"""

from __future__ import annotations

import torch

from helix_serve.config import TOY_DRAFT, TOY_TARGET, EngineConfig
from helix_serve.engine.llm_engine import LLMEngine
from helix_serve.engine.sampling_params import SamplingParams

MARGIN_BYTES = 1 << 20


def main() -> None:
    engine = LLMEngine(EngineConfig(target_model=TOY_TARGET, draft_model=TOY_DRAFT, device="cuda", dtype="float32",
                                    num_kv_blocks=512, max_num_seqs=16, max_num_batched_tokens=8192,
                                    enable_prefix_caching=False))  # the batch must prefill again, not hit the cache
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 200, (400,), generator=gen).tolist() for _ in range(12)]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    torch.cuda.empty_cache()  # forget what start-up calibration's wide passes reserved
    torch.cuda.reset_peak_memory_stats()
    reference = [engine.generate([p], params)[0].token_ids for p in prompts]  # one-sequence steps only
    peak = torch.cuda.max_memory_reserved()

    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((peak + MARGIN_BYTES) / total)
    capped = engine.generate(prompts, params)
    torch.cuda.set_per_process_memory_fraction(1.0)
    failed = [o for o in capped if o.finish_reason == "error"]
    finished = [(o, ref) for o, ref in zip(capped, reference) if o.finish_reason != "error"]
    preemptions = sum(o.stats["num_preemptions"] for o in capped)
    print(f"capped at {(peak + MARGIN_BYTES) / 2**20:.0f} MiB (one sequence's peak reserved + 1 MiB): "
          f"{len(finished)} finished, {len(failed)} failed, {preemptions} preemptions; "
          f"errors: {sorted({o.error[:60] for o in failed})}")
    assert all(o.error.startswith("out of memory") for o in failed), "a failure other than out of memory"
    assert all(o.token_ids == ref for o, ref in finished), "a finished request's tokens differ"
    assert engine.kv_usage()["used_blocks"] == 0, "KV blocks leaked"
    assert failed or preemptions, "the cap did not bite: no out-of-memory happened"

    again = [o.token_ids for o in engine.generate(prompts, params)]
    assert again == reference, "after the cap was lifted the engine's output changed"
    print(f"OK: a real CUDA OOM was survived; {engine.scheduler.max_num_seqs} sequences allowed after, output "
          "unchanged once memory was back")


if __name__ == "__main__":
    main()
