"""What an EAGLE head learns from: the target's own answers, then its features and distributions over them.

1. Answers: Helix's engine (target only, continuous batching) answers the prompt set greedily, then in
   sampled rounds; each finished answer is appended to a JSONL file at once, so a run resumes where it stopped.
2. Features: one teacher-forced target pass over prompt + answer (`forward_with_features` over a scratch
   pool) keeps the captured residual streams at every position and the target's top-k next-token
   probabilities at the positions that predict answer tokens. Stored in chunks of CHUNK answers
   (`features/chunk_NNNNN.safetensors`, bf16 features); a chunk already complete is never recomputed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from helix_serve.distill.data import chat_prompt_ids
from helix_serve.model.attention import AttentionMetadata
from helix_serve.model.paged_llm import KVCache, PagedCausalLM

CHUNK = 64  # answers per feature file
TOP_K = 8  # target probabilities kept per position
MAX_BATCH_TOKENS = 2048  # tokens per teacher-forced pass
BLOCK_SIZE = 16


@dataclass(slots=True)
class Answer:
    """One chat prompt (template applied) and the target's answer to it, as token ids."""

    prompt: str
    round: int  # 0 = greedy, r > 0 = sampled at T = 0.8 with seed r
    prompt_ids: list[int]
    response_ids: list[int]


def read_answers(path: Path) -> list[Answer]:
    if not path.exists():
        return []
    return [Answer(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def generate_answers(engine, prompts: list[str], path: Path, deadline: float, rounds: int,
                     max_tokens: int) -> list[Answer]:
    """Answer every prompt in `rounds` rounds (greedy, then sampled) until `deadline` (time.monotonic())."""
    from helix_serve.engine.sampling_params import SamplingParams  # the engine loads only for this stage

    done = {(a.prompt, a.round) for a in read_answers(path)}
    with path.open("a") as f:
        for round_ in range(rounds):
            todo = [p for p in prompts if (p, round_) not in done]
            params = [SamplingParams(max_tokens=max_tokens, temperature=0.8 if round_ else 0.0, top_p=0.95,
                                     seed=round_ * 100_003 + i if round_ else None, speculative=False)
                      for i in range(len(todo))]
            requests = {engine.add_request(chat_prompt_ids(engine.tokenizer, p), sp): p for p, sp in zip(todo, params)}
            bar = tqdm(total=len(requests), desc=f"target answers, round {round_}", unit="answer")
            while engine.has_unfinished_requests():
                if time.monotonic() > deadline:
                    for request_id in requests:
                        engine.abort_request(request_id)
                    bar.close()
                    return read_answers(path)
                for out in (o for o in engine.step() if o.finished):
                    prompt = requests[out.request_id]
                    answer = Answer(prompt, round_, chat_prompt_ids(engine.tokenizer, prompt), out.token_ids)
                    f.write(json.dumps(asdict(answer)) + "\n")
                    f.flush()
                    bar.update()
            bar.close()
    return read_answers(path)


def chunk_path(feature_dir: Path, index: int) -> Path:
    return feature_dir / f"chunk_{index:05d}.safetensors"


def chunk_size_on_disk(path: Path) -> int:
    """How many answers a stored chunk holds (0 if absent)."""
    if not path.exists():
        return 0
    with safe_open(path, "pt") as f:
        return int(f.metadata()["num_answers"])


@torch.inference_mode()
def teacher_forced(model: PagedCausalLM, seqs: list[list[int]], capture_layers: tuple[int, ...],
                   first_scored: list[int]) -> list[dict[str, torch.Tensor]]:
    """One varlen target pass over `seqs`: per sequence its [L, 3H] features and [L, TOP_K] top ids/probs
    of the next token at positions >= first_scored[i] (probabilities 0 elsewhere and at the last position)."""
    lens = [len(s) for s in seqs]
    blocks = [-(-n // BLOCK_SIZE) for n in lens]
    starts = torch.tensor(blocks).cumsum(0) - torch.tensor(blocks)
    tables = [list(range(int(s), int(s) + b)) for s, b in zip(starts, blocks)]
    kv = KVCache.allocate(model.shape, sum(blocks), BLOCK_SIZE, model.dtype, model.device)
    meta = AttentionMetadata.build(tables, lens, lens, BLOCK_SIZE, model.device)
    ids = torch.tensor([t for s in seqs for t in s], device=model.device)
    hidden, features = model.forward_with_features(ids, meta, kv, capture_layers)
    out, offset = [], 0
    for seq, n, first in zip(seqs, lens, first_scored):
        top_ids = torch.zeros(n, TOP_K, dtype=torch.int32)
        top_probs = torch.zeros(n, TOP_K, dtype=torch.float16)
        for a in range(first, n - 1, 256):  # the LM head over 49k tokens in slices: [256, V] at a time
            b = min(a + 256, n - 1)
            probs = model.compute_logits(hidden[offset + a : offset + b]).softmax(-1).topk(TOP_K, dim=-1)
            top_ids[a:b], top_probs[a:b] = probs.indices.int().cpu(), probs.values.half().cpu()
        out.append({"features": features[offset : offset + n].to(torch.bfloat16).cpu(), "token_ids":
                    torch.tensor(seq, dtype=torch.int32), "top_ids": top_ids, "top_probs": top_probs})
        offset += n
    return out


def _micro_batches(answers: list[Answer], max_tokens: int) -> list[list[Answer]]:
    batches, current, size = [], [], 0
    for a in answers:
        n = len(a.prompt_ids) + len(a.response_ids)
        if current and size + n > max_tokens:
            batches.append(current)
            current, size = [], 0
        current.append(a)
        size += n
    return batches + ([current] if current else [])


def extract_features(model: PagedCausalLM, answers: list[Answer], capture_layers: tuple[int, ...],
                     feature_dir: Path, deadline: float) -> list[Path]:
    """Store the features of `answers` in chunks of CHUNK (complete chunks on disk are kept); returns the
    chunk files. Stops between chunks at `deadline`."""
    feature_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in tqdm(range(-(-len(answers) // CHUNK)), desc="target features", unit="chunk"):
        group = answers[index * CHUNK : (index + 1) * CHUNK]
        path = chunk_path(feature_dir, index)
        if chunk_size_on_disk(path) != len(group):
            if time.monotonic() > deadline:
                break
            _write_chunk(model, group, capture_layers, path)
        paths.append(path)
    return paths


def _write_chunk(model: PagedCausalLM, group: list[Answer], capture_layers: tuple[int, ...], path: Path) -> None:
    rows = []
    for batch in _micro_batches(group, MAX_BATCH_TOKENS):
        seqs = [a.prompt_ids + a.response_ids for a in batch]
        rows += teacher_forced(model, seqs, capture_layers, [len(a.prompt_ids) - 1 for a in batch])
    tensors = {key: torch.cat([r[key] for r in rows]) for key in rows[0]}
    tensors["seq_lens"] = torch.tensor([len(r["token_ids"]) for r in rows], dtype=torch.int32)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"num_answers": str(len(group)), "capture_layers": json.dumps(capture_layers)})
    tmp.replace(path)  # atomic: a cut-off write never looks like a finished chunk


@dataclass(slots=True)
class FeatureSequence:
    """One answer's training inputs, as views into a loaded chunk."""

    features: torch.Tensor  # [L, 3H] bf16
    token_ids: torch.Tensor  # [L] int32
    top_ids: torch.Tensor  # [L, TOP_K] int32 target ids of the next token
    top_probs: torch.Tensor  # [L, TOP_K] fp16; all 0 where the position predicts no answer token


def load_sequences(paths: list[Path]) -> list[FeatureSequence]:
    """Every stored answer, in order."""
    seqs = []
    for path in paths:
        with safe_open(path, "pt") as f:
            t = {key: f.get_tensor(key) for key in f.keys()}
        for start, n in zip((t["seq_lens"].cumsum(0) - t["seq_lens"]).tolist(), t["seq_lens"].tolist()):
            part = slice(start, start + n)
            seqs.append(FeatureSequence(t["features"][part], t["token_ids"][part], t["top_ids"][part],
                                        t["top_probs"][part]))
    return seqs
