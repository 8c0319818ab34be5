"""scripts/train_pair.py end to end on a stand-in corpus, with tiny settings: the target trained by the script,
its draft made by `helix distill`, the pair measured by the engine and described in the card."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from helix_serve.model.vocab_map import VOCAB_MAP_KEY
from tests.model_factory import CORPUS

ROOT = Path(__file__).resolve().parents[1]


def _script(monkeypatch):
    spec = importlib.util.spec_from_file_location("train_pair", ROOT / "scripts" / "train_pair.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_pair", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_train_pair_trains_the_target_and_makes_the_draft_with_helix_distill(tmp_path, monkeypatch):
    train_pair = _script(monkeypatch)
    text = "\n\n".join(CORPUS)  # about 3,500 words per work: windows of 512 tokens fit
    works = {name: text for name in ("sonnets", "the_tempest", *train_pair.HELD_OUT_WORKS)}
    monkeypatch.setattr(train_pair, "fetch_corpus", lambda cache: works)
    out = tmp_path / "pretrained"
    train_pair.main(["--run-dir", str(tmp_path / "run"), "--out-dir", str(out), "--target-steps", "2",
                     "--eval-prompts", "2", "--distill-minutes", "0.05", "--distill-prompts", "2"])

    target = json.loads((out / "helix-target" / "config.json").read_text())
    assert target["num_hidden_layers"] == 6 and target["max_position_embeddings"] == 512
    draft = json.loads((out / "helix-draft" / "config.json").read_text())
    assert len(draft[VOCAB_MAP_KEY]) == draft["vocab_size"] == target["vocab_size"]  # helix distill's draft
    shipped = {p.name for p in (out / "helix-draft").iterdir()}
    assert {"README.md", "distill.json", "model.safetensors"} <= shipped
    assert not shipped & {"answers.jsonl", "checkpoint.pt", "draft_vocab.json"}  # distill's work files stay behind
    assert "helix distill --target" in (out / "helix-draft" / "README.md").read_text()

    ev = json.loads((out / "eval.json").read_text())
    assert ev["training"]["target_steps"] == 2 and ev["engine"]["num_eval_prompts"] == 2
    assert 0.0 <= ev["engine"]["greedy"]["alpha"] <= 1.0 and ev["engine"]["draft_cost_ratio"] > 0
    card = (out / "README.md").read_text()
    assert f"| greedy | {ev['engine']['greedy']['alpha']:.3f} |" in card
    assert f"Held-out loss {ev['target']['held_out_loss']:.3f}" in card
