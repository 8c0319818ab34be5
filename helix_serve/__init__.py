"""Helix: lossless speculative decoding on a paged KV cache, served with Ray Serve."""

__version__ = "0.1.0"
