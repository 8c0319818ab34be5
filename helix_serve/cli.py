"""`helix generate`: run the engine from the command line, no server needed; `helix distill`: train a draft or
head; `helix serve`: serve a config file."""

from __future__ import annotations

import argparse
import json
import sys

from helix_serve.config import DEFAULT_DRAFT, DEFAULT_TARGET, QUANTIZATIONS, EngineConfig
from helix_serve.engine.llm_engine import LLMEngine, RequestRejectedError
from helix_serve.engine.sampling_params import SPECULATIVE_METHODS, SamplingParams


def dense_rows_arg(value: str) -> int | str:
    """--int4-dense-rows: 'auto' or a row count >= 0."""
    if value == "auto":
        return value
    if not (value.isascii() and value.isdigit()):
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 0, got {value!r}")
    return int(value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="helix", description="Helix speculative-decoding engine")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate a continuation of PROMPT")
    gen.add_argument("prompt", help="a user message (sent through the model's chat template when it has one)")
    gen.add_argument("--raw", action="store_true", help="continue PROMPT as plain text, without the chat template")
    gen.add_argument("--target", default=DEFAULT_TARGET, help="target model: hub id, local dir or .gguf file")
    gen.add_argument("--draft", default=DEFAULT_DRAFT, help="draft model: hub id, local dir or .gguf file")
    gen.add_argument("--eagle-head", default=None,
                     help="an EAGLE head directory (helix distill --method eagle) instead of the draft model")
    gen.add_argument("--k", type=int, default=None, help="fixed number of draft tokens (default: planned per step)")
    gen.add_argument("--method", choices=SPECULATIVE_METHODS, default=None,
                     help="proposers: draft model, eagle head, ngram (prompt lookup) or hybrid (default: hybrid)")
    gen.add_argument("--no-speculative", action="store_true", help="plain decoding with the target alone")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--device", default="auto", help="auto | cpu | cuda | directml (HELIX_DEVICE overrides)")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--quantization", choices=QUANTIZATIONS, default="auto",
                     help="auto: int4 on a CPU for a 4-bit (Q4_1 GGUF) checkpoint, else none; int4: 4-bit projections "
                          "(CPU only; not the fp32 numerics); none: the weights as loaded")
    gen.add_argument("--int4-dense-rows", type=dense_rows_arg, default=0,
                     help="int4: passes of at least this many rows run a bf16 copy of the 4-bit weights; auto: "
                          "measured at load; 0 (default): never")
    gen.add_argument("--no-prefix-caching", action="store_true",
                     help="recompute every prompt (no reuse of cached prefix blocks)")
    gen.add_argument("--json", action="store_true", help="print text, token_ids and stats as JSON")

    dist = commands.add_parser("distill", help="train a draft model for TARGET (self-distillation)")
    dist.add_argument("--target", default=DEFAULT_TARGET, help="target model: hub id, local dir or .gguf file")
    dist.add_argument("--out", required=True, help="directory for the draft, its model card and checkpoints")
    dist.add_argument("--budget-minutes", type=float, default=110.0, help="wall-clock budget for the whole run")
    dist.add_argument("--resume", action="store_true", help="continue from the answers and checkpoint in --out")
    dist.add_argument("--seed", type=int, default=0)
    dist.add_argument("--layers", type=int, default=2, help="draft layers (the target's first ones, retrained)")
    dist.add_argument("--draft-vocab", type=int, default=8192, help="size of the draft's sub-vocabulary")
    dist.add_argument("--batch-size", type=int, default=16, help="training batch (sequences)")
    dist.add_argument("--threads", type=int, default=2, help="torch threads")
    dist.add_argument("--max-prompts", type=int, default=None, help="only the first N prompts (quick runs)")
    dist.add_argument("--method", choices=("draft", "eagle"), default="draft",
                      help="draft: an early-exit draft model; eagle: a head on the target's own features")
    dist.add_argument("--rounds", type=int, default=4, help="eagle: answer rounds (greedy, then sampled at T=0.8)")
    dist.add_argument("--max-answer-tokens", type=int, default=192, help="eagle: longest answer generated")
    dist.add_argument("--ttt-steps", type=int, default=3, help="eagle: training-time-test depth")
    dist.add_argument("--eval-max-tokens", type=int, default=64,
                      help="eagle: tokens per held-out prompt in each evaluation run (K = 1-6, greedy and T = 0.8)")
    dist.add_argument("--init-from", default=None,
                      help="eagle: fine-tune this saved head (e.g. a shipped one) on new answers instead of a new head")

    srv = commands.add_parser("serve", help="serve a Serve config file (`serve run CONFIG`), the cluster it starts "
                              "kept off the cores the engines reserve (`cpu_cores`)")
    srv.add_argument("config", nargs="?", default="serve_config.yaml")
    srv.add_argument("serve_args", nargs=argparse.REMAINDER, help="passed on to `serve run` (after CONFIG)")
    return parser


def _distill(args: argparse.Namespace, argv: list[str] | None) -> int:
    from pathlib import Path

    from helix_serve.distill.run import DistillArgs, distill  # training code loads only for this command

    command = "helix " + " ".join(argv if argv is not None else sys.argv[1:])
    facts = distill(DistillArgs(
        target=args.target, out=Path(args.out), budget_minutes=args.budget_minutes, resume=args.resume,
        seed=args.seed, num_layers=args.layers, draft_vocab_size=args.draft_vocab, batch_size=args.batch_size,
        threads=args.threads, max_prompts=args.max_prompts, command=command, method=args.method,
        rounds=args.rounds, max_answer_tokens=args.max_answer_tokens, ttt_steps=args.ttt_steps,
        eval_max_tokens=args.eval_max_tokens, init_from=Path(args.init_from) if args.init_from else None,
    ))
    keys = ("greedy", "t0.8", "draft_cost_ratio", "verify_cost_ratio") if args.method == "draft" else \
        ("train", "num_answers", "evaluation")
    print(json.dumps({k: facts[k] for k in keys}, indent=2))
    return 0


def _prompt(engine: LLMEngine, text: str, raw: bool) -> str | list[int]:
    """Instruct models answer a chat turn; models without a chat template continue the text."""
    if raw or not engine.tokenizer.chat_template:
        return text
    messages = [{"role": "user", "content": text}]
    return engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "distill":
            return _distill(args, argv)
        if args.command == "serve":
            from pathlib import Path

            from helix_serve.serving.launch import serve_run

            serve_run(Path(args.config), args.serve_args)  # returns only by raising
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            seed=args.seed, stop=args.stop, speculative=not args.no_speculative, num_speculative_tokens=args.k,
        )
        # prompt lookup needs no draft model, and an EAGLE head replaces it
        needs_draft = not args.no_speculative and args.method not in ("ngram", "eagle") and args.eagle_head is None
        config = EngineConfig(target_model=args.target, draft_model=args.draft if needs_draft else None,
                              eagle_head=args.eagle_head if not args.no_speculative else None,
                              speculative_method=args.method, device=args.device, dtype=args.dtype,
                              quantization=args.quantization, int4_dense_rows=args.int4_dense_rows,
                              enable_prefix_caching=not args.no_prefix_caching)
        engine = LLMEngine(config)
        [out] = engine.generate([_prompt(engine, args.prompt, args.raw)], params)
    except (ValueError, RequestRejectedError) as exc:
        print(f"helix: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                          **out.stats}))
    else:
        print(out.text)
    return 0 if out.finish_reason != "error" else 1


if __name__ == "__main__":
    sys.exit(main())
