"""Micro-benchmark of the prompt-lookup proposer: 32 sequences of 4k tokens, K=4, n in 1..3."""

import time

import torch

from helix_serve.engine.ngram_proposer import ngram_propose


def main(vocab: int, num_rows: int = 32, length: int = 4096, k: int = 4, iters: int = 50) -> None:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (num_rows, length), generator=gen)  # small vocab: many candidate matches
    lengths = torch.full((num_rows,), length)
    ngram_propose(tokens, lengths, k)  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        ngram_propose(tokens, lengths, k)
    ms = (time.perf_counter() - start) / iters * 1e3
    print(f"ngram_propose: {num_rows} rows x {length} tokens, K={k}, vocab {vocab}: {ms:.3f} ms/step (CPU, torch)")


if __name__ == "__main__":
    for vocab in (49152, 200):
        main(vocab)
