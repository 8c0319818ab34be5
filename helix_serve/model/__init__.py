"""Model side: paged attention, the paged causal LM wrapper and model-pair loading."""
