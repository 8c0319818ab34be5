"""Engine core: blocks, sequences, scheduling, sampling and the speculative step. No Ray, no HTTP."""
