"""Structured outputs: constraints (constraint.py), the grammar engine behind one interface (grammar.py) and
the per-step token masks that keep speculative decoding exact under them (masks.py)."""
