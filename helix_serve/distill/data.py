"""The target's own answers to the prompt set, with its next-token distributions: what a draft learns from.

Answers are generated in batches with transformers' `generate` (greedy first, then sampled rounds for
variety). Generating already computes the target's logits at every answer position, so the top
`TOP_K` probabilities of each are kept with the answer: training then needs no second target pass,
which on a 2-core CPU is most of the cost. Appended to a JSONL file, so an interrupted run resumes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm


@dataclass(slots=True)
class Example:
    """One chat prompt (template applied) and the target's answer, as token ids."""

    prompt: str
    round: int  # 0 = greedy, r > 0 = sampled with seed r
    prompt_ids: list[int]
    response_ids: list[int]
    top_ids: list[list[int]]  # [answer position][TOP_K] the target's most likely next tokens there
    top_probs: list[list[float]]  # their probabilities (softmax of the raw logits, temperature 1)


TOP_K = 16


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The token ids of a one-turn chat, ending where the assistant starts to answer; a base model (no chat
    template) continues the text itself, as `helix generate` has it do."""
    if not tokenizer.chat_template:
        return tokenizer(prompt).input_ids
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]


def read_examples(path: Path) -> list[Example]:
    if not path.exists():
        return []
    return [Example(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


@torch.inference_mode()
def _generate_batch(model, tokenizer, prompts: list[str], round_: int, max_new_tokens: int) -> list[Example]:
    ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])  # left padding
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    sampling = {"do_sample": True, "temperature": 0.8, "top_p": 0.95} if round_ else {"do_sample": False}
    if round_:
        torch.manual_seed(round_ * 100_003 + len(prompts))
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         pad_token_id=pad, return_dict_in_generate=True, output_logits=True, **sampling)
    top = torch.stack(out.logits, dim=1).float().softmax(-1).topk(TOP_K, dim=-1)  # [B, steps, TOP_K]
    examples = []
    eos = tokenizer.eos_token_id
    for b, (prompt, prompt_ids, row) in enumerate(zip(prompts, ids, out.sequences[:, width:].tolist())):
        n = row.index(eos) + 1 if eos in row else len(row)
        probs = [[round(p, 5) for p in ps] for ps in top.values[b, :n].tolist()]
        examples.append(Example(prompt, round_, prompt_ids, row[:n], top.indices[b, :n].tolist(), probs))
    return examples


def generate_responses(model, tokenizer, prompts: list[str], path: Path, deadline: float, batch_size: int = 32,
                       max_new_tokens: int = 160, max_rounds: int = 4) -> list[Example]:
    """Answer every prompt greedily, then in sampled rounds, until `deadline` (time.monotonic()) or max_rounds."""
    done = {(e.prompt, e.round) for e in read_examples(path)}
    with path.open("a") as f:
        for round_ in range(max_rounds):
            todo = [p for p in prompts if (p, round_) not in done]
            for i in tqdm(range(0, len(todo), batch_size), desc=f"target answers, round {round_}", unit="batch"):
                if time.monotonic() > deadline:
                    return read_examples(path)
                for example in _generate_batch(model, tokenizer, todo[i : i + batch_size], round_, max_new_tokens):
                    f.write(json.dumps(asdict(example)) + "\n")
                f.flush()
    return read_examples(path)
