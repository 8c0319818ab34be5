"""`helix distill` end to end on a tiny target: answers, sub-vocabulary draft, training, resume, model card."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from helix_serve.cli import main as helix_main
from helix_serve.distill.draft_model import build_draft
from helix_serve.distill.run import DistillArgs, distill
from helix_serve.engine.sampling_params import SamplingParams
from helix_serve.model.vocab_map import VOCAB_MAP_KEY
from tests.helpers import make_engine
from tests.model_factory import make_model, make_tokenizer

CHAT_TEMPLATE = "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def _chat_target(path, arch: str):
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    model = make_model(arch, len(tokenizer), 64, 2, 4, 2, seed=7)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    return _chat_target(tmp_path_factory.mktemp("chat-target"), "llama")[0]


def test_distill_writes_a_loadable_draft_and_resumes(tiny_target, tmp_path):
    args = DistillArgs(target=str(tiny_target), out=tmp_path / "draft", budget_minutes=0.3, num_layers=1,
                       draft_vocab_size=64, batch_size=4, max_prompts=48, threads=1,
                       command="helix distill (test)")
    facts = distill(args)
    out = args.out
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and len(config[VOCAB_MAP_KEY]) == config["vocab_size"] == 64
    assert facts["train"]["steps"] > 0 and facts["num_examples"] > 0
    assert 0.0 <= facts["greedy"]["alpha"] <= 1.0 and facts["draft_cost_ratio"] > 0
    card = (out / "README.md").read_text()
    assert "helix distill (test)" in card and f"{facts['greedy']['alpha']:.3f}" in card

    # The draft is an ordinary checkpoint: the engine loads it, and speculation keeps greedy exact.
    engine = make_engine((tiny_target, out))
    prompts = ["the quick brown", "def add"]
    spec = engine.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True, num_speculative_tokens=3))
    plain = engine.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True, speculative=False))
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]

    # --resume with a larger budget trains on from the checkpoint and keeps the answers already written.
    answers = (out / "answers.jsonl").read_text().splitlines()
    (out / "answers.jsonl").write_text("\n".join(answers[: len(answers) // 2]) + "\n")  # as if cut off mid-way
    resumed = distill(dataclasses.replace(args, resume=True, budget_minutes=0.5))
    assert json.loads((out / "config.json").read_text())[VOCAB_MAP_KEY] == config[VOCAB_MAP_KEY]  # rows keep meaning
    assert resumed["train"]["steps"] > facts["train"]["steps"]
    assert resumed["train"]["seconds"] >= 0.45 * 0.5 * 60
    assert (out / "answers.jsonl").read_text().splitlines()[: len(answers) // 2] == answers[: len(answers) // 2]


def test_a_qwen2_target_gets_a_qwen2_draft_with_its_biases(tmp_path):
    path, target = _chat_target(tmp_path / "qwen2-target", "qwen2")
    draft = build_draft(target, num_layers=1, vocab_size=64)
    assert type(draft) is type(target) and draft.config.model_type == "qwen2"
    theirs, mine = target.model.layers[0].state_dict(), draft.model.layers[0].state_dict()
    assert mine.keys() == theirs.keys() and "self_attn.q_proj.bias" in mine
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)

    args = DistillArgs(target=str(path), out=tmp_path / "draft", budget_minutes=0.05, num_layers=1,
                       draft_vocab_size=64, batch_size=2, max_prompts=2, threads=1)
    facts = distill(args)
    config = json.loads((args.out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and len(config["layer_types"]) == 1
    assert facts["train"]["steps"] > 0 and 0.0 <= facts["greedy"]["alpha"] <= 1.0
    engine = make_engine((path, args.out))
    prompts = ["the quick brown", "def add"]
    spec = engine.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True, num_speculative_tokens=3))
    plain = engine.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True, speculative=False))
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]


def test_distill_refuses_a_draft_deeper_than_its_target_before_answering(tiny_target, tmp_path):
    args = DistillArgs(target=str(tiny_target), out=tmp_path / "draft", budget_minutes=0.05, num_layers=3)
    with pytest.raises(ValueError, match="--layers must be 1 to 2"):
        distill(args)
    assert not (args.out / "answers.jsonl").exists()


def test_distill_cli_refuses_a_missing_gguf(tmp_path, capsys):
    code = helix_main(["distill", "--target", str(tmp_path / "nowhere.gguf"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
