"""`helix distill --method eagle` end to end on a tiny target: engine answers, feature chunks, head, resume."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from helix_serve.cli import main as helix_main
from helix_serve.distill.eagle_data import read_answers
from helix_serve.distill.eagle_trainer import EagleTrainConfig
from helix_serve.distill.run import DistillArgs, distill
from helix_serve.model.eagle_head import EagleConfig, EagleHead
from helix_serve.model.loader import load_model
from tests.model_factory import make_model, make_tokenizer
from tests.test_distill import CHAT_TEMPLATE


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    path = tmp_path_factory.mktemp("eagle-target")
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    make_model("llama", len(tokenizer), 64, 4, 4, 2, seed=7).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_distill_eagle_trains_a_loadable_head_and_resumes_without_regenerating(tiny_target, tmp_path):
    args = DistillArgs(target=str(tiny_target), out=tmp_path / "eagle", budget_minutes=0.4, draft_vocab_size=64,
                       max_prompts=40, rounds=2, max_answer_tokens=24, threads=1, method="eagle",
                       command="helix distill --method eagle (test)", eval_max_tokens=12)
    facts = distill(args)
    out = args.out
    config = json.loads((out / "eagle_config.json").read_text())
    assert config["capture_layers"] == [1, 2] and len(config["vocab_ids"]) == 64  # 4 layers: 2, 4 // 2, 4 - 3
    assert facts["num_answers"] == 80 and facts["num_trained_answers"] == 80  # 40 prompts x 2 rounds
    assert facts["train"]["step"] > 0 and len(facts["train"]["last_accuracy"]) == 3
    card = (out / "README.md").read_text()
    assert "helix distill --method eagle (test)" in card and "Fine-tuned" not in card  # a new head

    # The evaluation stage: the engine with speculative_method "eagle", K = 1..6, greedy and sampled.
    evaluation = facts["evaluation"]
    assert evaluation["num_eval_prompts"] == 40 and evaluation["speculative_method"] == "eagle"  # held out, capped
    assert json.loads((out / "distill.json").read_text())["evaluation"] == evaluation
    assert 0 < evaluation["eagle_cost_ratio"] < 1
    for label in ("greedy", "t0.8"):
        assert list(evaluation[label]) == ["1", "2", "3", "4", "5", "6"]
        for k, run in evaluation[label].items():
            assert run["proposers"] == ["eagle"] and run["num_drafting_steps"] > 0
            assert 0 <= run["alpha"] <= 1 and 0 <= run["accepted_per_step"] <= int(k)
            assert run["tokens_per_target_step"] >= 1
            assert f"| {label} | {k} | {run['alpha']:.3f} |" in card
    assert len((out / "loss.jsonl").read_text().splitlines()) == facts["train"]["step"]

    target = load_model(str(tiny_target), torch.device("cpu"), "float32")
    head = EagleHead.load(out, target.embed_tokens)
    assert head.config.capture_layers == (1, 2) and head.dtype == torch.float32

    # --resume: the answers and feature chunks are kept as they are; training continues from its checkpoint.
    answers = (out / "answers.jsonl").read_text()
    chunks = {p.name: p.stat().st_mtime_ns for p in (out / "features").glob("chunk_*")}
    resumed = distill(dataclasses.replace(args, resume=True, budget_minutes=0.6))
    assert (out / "answers.jsonl").read_text() == answers
    assert {p.name: p.stat().st_mtime_ns for p in (out / "features").glob("chunk_*")} == chunks
    assert resumed["train"]["step"] > facts["train"]["step"]
    assert resumed["train"]["elapsed_s"] >= 0.45 * 0.6 * 60
    assert len(read_answers(out / "answers.jsonl")) == 80


def test_distill_cli_takes_the_eagle_method(tiny_target, tmp_path, capsys):
    code = helix_main(["distill", "--method", "eagle", "--target", str(tiny_target), "--out", str(tmp_path / "e"),
                       "--budget-minutes", "0.15", "--max-prompts", "8", "--rounds", "1", "--max-answer-tokens", "8",
                       "--draft-vocab", "32", "--threads", "1", "--eval-max-tokens", "4"])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0 and printed["num_answers"] == 8 and printed["evaluation"]["eval_max_tokens"] == 4
    assert (tmp_path / "e" / "model.safetensors").exists()
    assert json.loads((tmp_path / "e" / "distill.json").read_text())["num_answers"] == 8


def test_distill_eagle_fine_tunes_a_saved_head_keeping_its_layers_and_vocabulary(tiny_target, tmp_path):
    target = load_model(str(tiny_target), torch.device("cpu"), "float32")
    vocab_ids = list(range(3, 51))  # not what a new run would choose (the 64 most frequent answer tokens)
    start = EagleHead(EagleConfig.for_target(target.hf_model.config, (0, 3), vocab_ids), target.embed_tokens)
    start.save(tmp_path / "shipped")
    made = {"args": {"command": "helix distill --method eagle (first)"}, "num_answers": 9,
            "train": {"step": 12, "elapsed_s": 180.0}}
    (tmp_path / "shipped" / "distill.json").write_text(json.dumps(made))
    args = DistillArgs(target=str(tiny_target), out=tmp_path / "ft", budget_minutes=0.2, draft_vocab_size=64,
                       max_prompts=8, rounds=1, max_answer_tokens=12, threads=1, method="eagle",
                       eval_max_tokens=4, init_from=tmp_path / "shipped")
    facts = distill(args)
    tuned = EagleHead.load(args.out, target.embed_tokens)
    assert tuned.config.capture_layers == (0, 3) and list(tuned.config.vocab_ids) == vocab_ids
    assert json.loads((args.out / "eagle_vocab.json").read_text()) == vocab_ids
    assert facts["capture_layers"] == [0, 3] and facts["train"]["step"] > 0
    assert facts["init_from"] == {"path": str(tmp_path / "shipped"), "command": "helix distill --method eagle (first)",
                                  "num_answers": 9, "steps": 12, "train_minutes": 3.0}
    assert (f"Fine-tuned (`--init-from`) from the head in `{tmp_path / 'shipped'}` (`helix distill --method eagle "
            "(first)`; 9 answers, 12 steps, 3 min of training)") in (args.out / "README.md").read_text()
    # trained from the saved weights, not from a new head's (whose LM head starts as the target's rows)
    moved = (tuned.fc.weight - start.fc.weight.to(tuned.dtype)).abs().max().item()
    assert 0 < moved <= 2 * EagleTrainConfig().lr * facts["train"]["step"]  # Adam moves a weight ~lr per step
    # a fine-tune resumes too (its saved sub-vocabulary is the head's, read back as a list, not a tuple)
    resumed = distill(dataclasses.replace(args, resume=True, budget_minutes=0.1))
    assert resumed["num_answers"] == facts["num_answers"] and resumed["train"]["step"] >= facts["train"]["step"]


def test_distill_eagle_rejects_what_it_cannot_fine_tune(tiny_target, tmp_path, capsys):
    base = ["distill", "--method", "eagle", "--target", str(tiny_target), "--out", str(tmp_path / "e"),
            "--budget-minutes", "0.1", "--max-prompts", "2", "--threads", "1"]
    assert helix_main([*base, "--init-from", str(tmp_path)]) == 2  # no head there
    assert "not an EAGLE head directory" in capsys.readouterr().err
    assert helix_main([*base[:2], "draft", *base[3:], "--init-from", str(tmp_path)]) == 2
    assert "use it with --method eagle" in capsys.readouterr().err
    other = make_model("llama", 100, 64, 4, 4, 2, seed=3)  # another vocabulary
    target = load_model(str(tiny_target), torch.device("cpu"), "float32")
    other_head = EagleHead(EagleConfig.for_target(other.config, (1, 2), list(range(32))), target.embed_tokens)
    other_head.save(tmp_path / "other")
    assert helix_main([*base, "--init-from", str(tmp_path / "other")]) == 2
    assert "made for another target" in capsys.readouterr().err
