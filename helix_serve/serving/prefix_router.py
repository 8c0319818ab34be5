"""Prefix-cache-aware routing: send a request where its prompt's prefix went before, so the engine replica whose
prefix cache holds that prefix serves it (a conversation's next turn reuses the K/V of its history).

`PrefixAffinity` is the memory: chained hashes of the prompt text's leading blocks of `block_chars` characters →
the owner (an engine replica; for the ingress, an engine pool) last sent a request with that prefix, and when.
Knowledge older than `ttl_s` is ignored, and past `max_entries` hashes the oldest are forgotten. A prefix counts
only when it is at least `min_share` of the prompt and `min_blocks` long: a system prompt shared by every
conversation would otherwise send each new conversation to whichever replica served that prompt last, and
prompts that share a few words (less than a KV block) have nothing to reuse.

Text, not tokens: the ingress never loads the engine stack (no tokenizer). A conversation's next turn renders to
the same text prefix, so the same token prefix under the engine's chat template: the replica that served the
shorter text holds the blocks the longer one starts with. A block boundary in the text is not one in tokens;
what matters is only that a longer match means a longer shared prefix.

`PrefixAffinityRouter` is a Ray Serve request router (the public `ray.serve.request_router` API, set with
`request_router_config` in the YAML). It offers Serve the replicas holding the longest remembered prefix, and
Serve sends the request to the least loaded of them. When they are full, when the replicas' queues differ by more
than `imbalance_threshold` requests, or when none holds any of the prefix, it offers every replica and the least
loaded wins.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

BLOCK_CHARS = 16  # small: a conversation's own text starts a block of its own early
TTL_S = 600.0
MAX_ENTRIES = 200_000
MIN_SHARE = 0.5  # affinity only where the remembered prefix is at least this share of the prompt...
MIN_MATCH_CHARS = 64  # ...and at least this long, about one 16-token KV block: shorter has nothing to reuse


def prompt_text(request: Any) -> str | None:
    """The text a request's prompt renders from: its prompt, or its messages' roles and contents."""
    if getattr(request, "prompt", None) is not None:
        return request.prompt
    messages = getattr(request, "messages", None)
    if messages:
        return "".join(f"\x1e{m.get('role', '')}\x1f{m.get('content') or ''}" for m in messages)
    return None


def prefix_hashes(text: str, block_chars: int = BLOCK_CHARS) -> list[bytes]:
    """Chained hashes of the text's full blocks: hash j covers characters [0, (j + 1) · block_chars)."""
    hashes, parent = [], b"helix-route"
    for end in range(block_chars, len(text) + 1, block_chars):
        parent = hashlib.blake2b(parent + text[end - block_chars : end].encode(), digest_size=16).digest()
        hashes.append(parent)
    return hashes


@dataclass(slots=True)
class _Seen:
    owner: str
    at: float


class PrefixAffinity:
    """Which owner each remembered prefix went to last. Plain data, no Ray: the replica router and the
    ingress's pool choice both use it."""

    def __init__(self, ttl_s: float = TTL_S, max_entries: int = MAX_ENTRIES, min_share: float = MIN_SHARE,
                 min_blocks: int = MIN_MATCH_CHARS // BLOCK_CHARS, clock=time.monotonic):
        self.ttl_s, self.max_entries, self._clock = ttl_s, max_entries, clock
        self.min_share, self.min_blocks = min_share, min_blocks
        self._seen: OrderedDict[bytes, _Seen] = OrderedDict()

    def record(self, hashes: list[bytes], owner: str) -> None:
        now = self._clock()
        for h in hashes:
            self._seen[h] = _Seen(owner, now)
            self._seen.move_to_end(h)
        while len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)

    def matches(self, hashes: list[bytes], owners: set[str]) -> dict[str, int]:
        """Blocks of the prefix each of `owners` was last sent (their longest match, only fresh knowledge)."""
        now, found = self._clock(), {}
        for depth, h in enumerate(hashes, start=1):
            seen = self._seen.get(h)
            if seen is None or now - seen.at > self.ttl_s:
                break  # chained: no longer prefix can be known past a gap
            if seen.owner in owners:
                found[seen.owner] = depth
        return found

    def best(self, hashes: list[bytes], owners: set[str]) -> set[str]:
        """The owners holding the longest remembered prefix, if it is at least `min_share` of the prompt and
        `min_blocks` long (else empty: a shared system prompt alone must not herd every new conversation onto one
        owner, and prompts that share a few words have nothing to reuse)."""
        found = self.matches(hashes, owners)
        longest = max(found.values(), default=0)
        if longest < max(self.min_blocks, self.min_share * len(hashes)):
            return set()
        return {o for o, depth in found.items() if depth == longest}

    def forget(self, owner: str) -> None:
        for h in [h for h, seen in self._seen.items() if seen.owner == owner]:
            del self._seen[h]


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """Ray Serve request router for the engine deployments (module docstring)."""

    def initialize_state(self, imbalance_threshold: int = 4, block_chars: int = BLOCK_CHARS, ttl_s: float = TTL_S,
                         max_entries: int = MAX_ENTRIES, min_share: float = MIN_SHARE) -> None:
        self.imbalance_threshold, self.block_chars = imbalance_threshold, block_chars
        self.affinity = PrefixAffinity(ttl_s, max_entries, min_share, max(1, MIN_MATCH_CHARS // block_chars))

    def _hashes(self, pending_request: PendingRequest | None) -> list[bytes]:
        args = pending_request.args if pending_request is not None else ()
        text = prompt_text(args[0]) if args else None
        return prefix_hashes(text, self.block_chars) if text else []

    def _imbalanced(self, replicas: list[RunningReplica]) -> bool:
        loads = [self.replica_queue_len_cache.get(r.replica_id) for r in replicas]
        known = [q for q in loads if q is not None]
        return len(known) > 1 and max(known) - min(known) > self.imbalance_threshold

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        hashes = self._hashes(pending_request)
        if not hashes or len(candidate_replicas) < 2 or self._imbalanced(candidate_replicas):
            return [candidate_replicas]
        ids = {r.replica_id.to_full_id_str(): r for r in candidate_replicas}
        best = [ids[o] for o in self.affinity.best(hashes, set(ids))]
        room = [r for r in best if (self.replica_queue_len_cache.get(r.replica_id) or 0) < r.max_ongoing_requests]
        # Only the holders: a holder slow to answer Serve's queue-length probe (busy stepping) is retried with a
        # longer deadline rather than passed over for a replica without the prefix. Full holders yield to load.
        return [room] if room else [candidate_replicas]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self.affinity.record(self._hashes(pending_request), replica_id.to_full_id_str())

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.affinity.forget(replica_id.to_full_id_str())

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        gone = {r.to_full_id_str() for r in self._replica_id_set} - {r.replica_id.to_full_id_str() for r in replicas}
        super().update_replicas(replicas)
        for owner in gone:
            self.affinity.forget(owner)
