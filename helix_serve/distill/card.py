"""The model card `helix distill` writes beside the draft: what it is, how it was made, what it measures."""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def plot_loss(out_dir: Path) -> str | None:
    """loss.jsonl → loss_curve.png (matplotlib is optional: without it the card has no plot)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no loss curve plot")
        return None
    rows = [json.loads(line) for line in (out_dir / "loss.jsonl").read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.6, alpha=0.5, label="batch")
    window = 25
    smooth = [sum(r["loss"] for r in rows[max(0, i - window) : i + 1]) / len(rows[max(0, i - window) : i + 1])
              for i in range(len(rows))]
    ax.plot([r["step"] for r in rows], smooth, lw=1.5, label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="distillation loss (soft CE, nats)", title="draft distillation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss_curve.png", dpi=110)
    plt.close(fig)
    return "loss_curve.png"


def write_card(out_dir: Path, facts: dict) -> None:
    """README.md with the architecture, data, training, engine-measured acceptance and the command."""
    args, train = facts["args"], facts["train"]
    plot = plot_loss(out_dir)
    greedy, sampled = facts["greedy"], facts["t0.8"]
    lines = [
        "---", "license: apache-2.0", "library_name: transformers", f"base_model: {args['target']}", "---", "",
        f"# Helix draft for `{args['target']}`", "",
        "Made by `helix distill` (Helix's own command). Exact command:", "", "```bash", args["command"], "```", "",
        "## Architecture",
        f"An early exit of the target: its first {args['num_layers']} layers (same shapes, initialised from the "
        f"target's weights, then retrained), the target's final norm, and a tied embedding / LM head over a "
        f"sub-vocabulary of the {args['draft_vocab_size']} target tokens most frequent in the target's own answers "
        f"({facts['sub_vocab_coverage']:.2%} of answer tokens). `helix_vocab_map` in `config.json` maps draft rows to "
        "target ids; target tokens outside it get draft probability 0 (rejection sampling stays exact). "
        f"{facts['draft_params'] / 1e6:.1f}M parameters, stored in bf16.", "",
        "## Data and training",
        f"{facts['num_examples']} answers of the target ({facts['num_answer_tokens']} tokens) to Helix's offline "
        "prompt set (`helix_serve/distill/prompts.py`: questions, explanations, writing, code, summaries, "
        f"arithmetic; greedy, then sampled rounds at T=0.8 — {facts.get('num_sampled_examples', 0)} sampled answers "
        "in this run), with 5% of the prompts held out. The target's top-16 next-token "
        "probabilities at every answer position are kept from generation; loss: cross-entropy of the draft against "
        "them on the sub-vocabulary (KL up to a constant), answer positions only. "
        f"{train['steps']} steps, {train['tokens']} tokens, {train['seconds'] / 60:.1f} min of "
        f"training; final batch loss {train['last_loss']:.3f}. Whole run {facts['wall_seconds'] / 60:.1f} min on "
        f"{args['threads']} CPU threads.", "",
        *([f"![loss curve]({plot})", ""] if plot else []),
        "## Acceptance measured by Helix's engine",
        f"{facts['num_eval_prompts']} held-out prompts, {facts['eval_max_tokens']} tokens each, K = 4, "
        f"{facts['dtype']}, `speculative_method` fixed to `draft` (prompt lookup never proposes; by proposer: "
        f"greedy {greedy.get('by_proposer')}, T = 0.8 {sampled.get('by_proposer')}):", "",
        "| sampling | α (accepted / judged) | accepted / drafted | tokens per target step |", "|---|---|---|---|",
        f"| greedy | {greedy['alpha']:.3f} | {greedy['acceptance_rate']:.3f} | {greedy['tokens_per_target_step']:.2f} |",
        f"| T = 0.8 | {sampled['alpha']:.3f} | {sampled['acceptance_rate']:.3f} | "
        f"{sampled['tokens_per_target_step']:.2f} |", "",
        f"Cost ratios from the engine's start-up calibration: c = {facts['draft_cost_ratio']:.3f} (draft forward ÷ "
        f"target forward), v = {facts['verify_cost_ratio']:.3f} (extra verify cost per draft token).", "",
        "## Samples (held-out prompts, greedy, speculative)", "",
        *[f"**{s['prompt']}**\n\n> {s['answer'].strip()}\n" for s in facts["samples"]],
    ]
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")


def write_eagle_card(out_dir: Path, facts: dict) -> None:
    """README.md for an EAGLE head: architecture, data, training; acceptance only once the engine measured it."""
    args, train = facts["args"], facts["train"]
    plot = plot_loss(out_dir)
    accuracy = ", ".join(f"{a:.2f}" for a in train["last_accuracy"] or [])
    evaluation = facts.get("evaluation")
    lines = [
        "---", "license: apache-2.0", "library_name: helix", f"base_model: {args['target']}", "---", "",
        f"# Helix EAGLE head for `{args['target']}`", "",
        "Made by `helix distill --method eagle`. Exact command:", "", "```bash", args["command"], "```", "",
        "## Architecture",
        f"An EAGLE-3-style head (`helix_serve/model/eagle_head.py`): `fc` fuses the target's residual streams "
        f"entering layers {facts['capture_layers']}; one Llama decoder layer whose attention reads "
        "[embedding of the next token (the target's own embedding), fused feature]; RMSNorm; an LM head over "
        f"{len(json.loads((out_dir / 'eagle_config.json').read_text())['vocab_ids'])} target tokens "
        f"({facts['sub_vocab_coverage']:.2%} of answer tokens; `vocab_ids` in `eagle_config.json`; other tokens get "
        f"q = 0, rejection sampling stays exact). {facts['head_params'] / 1e6:.1f}M parameters, "
        f"{facts['head_bytes'] / 1e6:.1f} MB in bf16.", "",
        "## Data and training",
        *([_lineage_sentence(facts["init_from"])] if "init_from" in facts else []),
        f"{facts['num_answers']} answers of the target ({facts['num_answer_tokens']} answer tokens; "
        f"{facts['num_sampled_answers']} sampled at T = 0.8, the rest greedy) to Helix's offline prompt set, "
        "generated by Helix's engine (target only), 5% of the prompts held out. A teacher-forced target pass "
        f"stored the captured features and the top-8 next-token probabilities ({facts['num_trained_answers']} answers, "
        f"{facts['num_feature_tokens']} tokens). Loss: the training-time test over {train['ttt_steps']} steps of the "
        "head's own predicted features, soft cross-entropy to the target's distribution on the sub-vocabulary, "
        f"weighted 0.8^j. {train['step']} steps, {train['tokens']} tokens, {train['elapsed_s'] / 60:.1f} min of "
        f"training; last batch loss {train['last_loss']:.3f}, top-1 agreement with the target by depth {accuracy}. "
        f"Whole run {facts['wall_seconds'] / 60:.1f} min on {args['threads']} CPU thread(s).", "",
        *([f"![loss curve]({plot})", ""] if plot else []),
        "## Acceptance measured by Helix's engine", "",
        *(_eagle_evaluation(evaluation) if evaluation else
          ["Not measured.", ""]),
    ]
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")


def _lineage_sentence(init: dict) -> str:
    """The sentence on the head a fine-tuning run started from (eagle_run._lineage)."""
    made = [f"`{init['command']}`"] if init.get("command") else []
    if init.get("steps") is not None:
        made.append(f"{init['num_answers']} answers, {init['steps']} steps, "
                    f"{init['train_minutes']:.0f} min of training")
    if "init_from" in init:
        made.append(f"itself fine-tuned from `{init['init_from']['path']}`")
    return (f"Fine-tuned (`--init-from`) from the head in `{init['path']}`"
            + (f" ({'; '.join(made)})" if made else "") + ". This run's data and training:")


def _eagle_evaluation(evaluation: dict) -> list[str]:
    """One row per sampling and K, as distill/eagle_eval.py measured them."""
    rows = [f"| {label} | {k} | {e['alpha']:.3f} | {e['acceptance_rate']:.3f} | {e['accepted_per_step']:.2f} | "
            f"{e['tokens_per_target_step']:.2f} |"
            for label in ("greedy", "t0.8") for k, e in evaluation[label].items()]
    return [f"Helix's engine with `speculative_method: eagle` and K fixed per run, on "
            f"{evaluation['num_eval_prompts']} held-out prompts, up to {evaluation['eval_max_tokens']} tokens "
            f"each ({evaluation['dtype']}, quantization {evaluation.get('quantization', 'none')}, CPU; sampled: "
            f"T = 0.8, seed 1). One head pass costs "
            f"c = {evaluation['eagle_cost_ratio']:.3f} target forwards (the engine's calibration at start; each "
            f"extra verified token v = {evaluation['verify_cost_ratio']:.3f}).", "",
            "| sampling | K | α | accepted / drafted | accepted per step | tokens per target step |",
            "|---|---|---|---|---|---|", *rows, ""]
