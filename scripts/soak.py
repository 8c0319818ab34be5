"""Soak test: thousands of mixed requests (plain, streaming, batch, cancelled, invalid) against a local app.

Loopback only, bounded in count and time. Run from the repo root:
    RAY_AUTH_MODE=disabled python scripts/soak.py --quick            # ~200 requests, smoke test
    RAY_AUTH_MODE=disabled python scripts/soak.py --requests 2000 --json soak.json
    RAY_AUTH_MODE=disabled python scripts/soak.py --quick --real-pair  # on the default SmolLM2 pair
    python scripts/soak.py --url http://127.0.0.1:8000               # an app already running
Without --url it starts its own cluster and app: on the embedded toy pair (TOY_TARGET/TOY_DRAFT in
helix_serve/config.py; the tests' tiny random pair if it is missing), or with --real-pair on the default
pair (DEFAULT_TARGET/DEFAULT_DRAFT: SmolLM2), which serves about a tenth as many requests per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import httpx
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["the quick brown fox", "speculative decoding drafts tokens", "def add(a, b):", "paged attention reads"]
INVALID = [  # each must be a 4xx
    {"prompt": "   "}, {"prompt": "x", "max_tokens": 0}, {"prompt": "x", "temperature": -1}, {"prompt": 42},
    {"prompt": "x", "top_p": 2}, {"prompt": "x", "stop": [""]}, {"prompts": []}, {"prompt": "x", "timeout_s": 0},
]
KINDS = {"generate": 35, "stream": 25, "batch": 15, "cancelled": 10, "invalid": 15}  # weights in percent
REPLICA_PREFIX = "SERVE_REPLICA::helix#"


def sampling(rng: random.Random) -> dict:
    return {"max_tokens": rng.randint(4, 48), "temperature": rng.choice([0.0, 0.8]), "ignore_eos": rng.random() < .5}


async def run_one(client: httpx.AsyncClient, kind: str, rng: random.Random) -> str:
    """Send one request of `kind`; its outcome as '<kind>:<status or error>'."""
    body = {"prompt": rng.choice(PROMPTS), **sampling(rng)}
    if kind == "generate":
        return f"{kind}:{(await client.post('/generate', json=body)).status_code}"
    if kind == "batch":
        batch = {**sampling(rng), "prompts": rng.sample(PROMPTS, rng.randint(2, 4))}
        return f"{kind}:{(await client.post('/generate/batch', json=batch)).status_code}"
    if kind == "invalid":
        path = rng.choice(["/generate", "/generate/batch"])
        return f"{kind}:{(await client.post(path, json=rng.choice(INVALID))).status_code}"
    async with client.stream("POST", "/generate/stream", json={**body, "max_tokens": 64}) as response:
        async for line in response.aiter_lines():
            if kind == "cancelled" and line.startswith("event: chunk"):
                return f"{kind}:{response.status_code}"  # leaving the block closes the connection mid-stream
            if line.startswith("event: error"):
                return f"{kind}:error-event"
    return f"{kind}:{response.status_code}"


async def soak(url: str, num_requests: int, concurrency: int, max_seconds: float, seed: int) -> dict:
    rng = random.Random(seed)
    kinds = rng.choices(list(KINDS), weights=list(KINDS.values()), k=num_requests)
    outcomes: Counter[str] = Counter()
    latencies: dict[str, list[float]] = {}
    semaphore = asyncio.Semaphore(concurrency)
    deadline = time.monotonic() + max_seconds
    progress = tqdm(total=num_requests, desc="soak", unit="req")

    async def one(client: httpx.AsyncClient, kind: str) -> None:
        async with semaphore:
            if time.monotonic() > deadline:
                outcomes[f"{kind}:skipped-time-limit"] += 1
                return
            started = time.perf_counter()
            try:
                outcome = await run_one(client, kind, rng)
            except httpx.HTTPError as exc:
                outcome = f"{kind}:{type(exc).__name__}"
            outcomes[outcome] += 1
            latencies.setdefault(kind, []).append(time.perf_counter() - started)
            progress.update()

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await asyncio.gather(*(one(client, kind) for kind in kinds))
    progress.close()
    return {"num_requests": num_requests, "wall_seconds": round(time.perf_counter() - started, 2),
            "outcomes": dict(sorted(outcomes.items())), "latency_seconds": latency_summary(latencies)}


def percentile(values: list[float], q: float) -> float:
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 4) if len(values) > 1 else 0.0


def latency_summary(latencies: dict[str, list[float]]) -> dict:
    every = [v for values in latencies.values() for v in values]
    groups = {"all": every, **latencies}
    return {name: {"p50": percentile(v, 50), "p99": percentile(v, 99), "count": len(v)} for name, v in groups.items()}


def kv_blocks_in_use(url: str, settle_s: float = 10.0) -> int:
    """KV blocks still used once the engine had `settle_s` to finish aborts (0 when nothing leaked)."""
    deadline = time.monotonic() + settle_s
    while True:
        used = httpx.get(f"{url}/health", timeout=10).json()["kv_cache"]["used_blocks"]
        if used == 0 or time.monotonic() > deadline:
            return used
        time.sleep(0.2)


def replica_names() -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(REPLICA_PREFIX)}


def model_args(workdir: Path, real_pair: bool) -> dict:
    """The pair to soak, named explicitly: build_app's defaults are the real (slow) pair."""
    from helix_serve.config import DEFAULT_DRAFT, DEFAULT_TARGET, TOY_DRAFT, TOY_TARGET

    if real_pair:
        return {"target_model": DEFAULT_TARGET, "draft_model": DEFAULT_DRAFT}
    if Path(TOY_TARGET).exists():
        return {"target_model": TOY_TARGET, "draft_model": TOY_DRAFT}
    sys.path.insert(0, str(REPO))
    from tests.model_factory import make_pair_dirs

    target, draft = make_pair_dirs(workdir, "llama")
    return {"target_model": str(target), "draft_model": str(draft)}


@contextmanager
def local_app(workdir: Path, real_pair: bool) -> Iterator[str]:
    """The app on the pair `model_args` names, on a private local cluster; yields its URL."""
    from helix_serve.serving.app import build_app
    from helix_serve.serving.local import local_serve

    args = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 256, **model_args(workdir, real_pair)}
    with local_serve(build_app(args), log_to_driver=False) as url:
        yield url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an app already running on loopback (default: start one)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="a ~200-request smoke test")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=900, help="stop sending after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real-pair", action="store_true", help="soak the default SmolLM2 pair, not the toy pair")
    parser.add_argument("--json", type=Path, help="write the report here")
    opts = parser.parse_args()
    num_requests = 200 if opts.quick else opts.requests
    if opts.url and urlparse(opts.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("--url must be a loopback address")
    if opts.url and opts.real_pair:
        parser.error("--real-pair chooses the pair of the app this script starts; --url names a running one")

    def run(url: str, restarts_of) -> dict:
        before = restarts_of()
        report = asyncio.run(soak(url, num_requests, opts.concurrency, opts.max_seconds, opts.seed))
        report["kv_blocks_in_use_at_end"] = kv_blocks_in_use(url)
        after = restarts_of()
        report["replica_restarts"] = None if before is None else len(after - before)
        return report

    if opts.url:
        report = run(opts.url.rstrip("/"), lambda: None)  # another process owns the cluster: no replica view
    else:
        with tempfile.TemporaryDirectory() as workdir, local_app(Path(workdir), opts.real_pair) as url:
            report = run(url, replica_names)
    print(json.dumps(report, indent=2))
    if opts.json:
        opts.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
