"""Logprobs' token texts and per-step text work (issue 31), on a model that writes a known script in SmolLM2's
vocabulary: "café 🙂 ok\\n" with 'é' and '🙂' spelled as their UTF-8 bytes, one byte-level token each."""

from __future__ import annotations

import asyncio
import threading

import pytest

from helix_serve.config import EngineConfig
from helix_serve.engine.llm_engine import LLMEngine
from helix_serve.engine.sampling_params import SamplingParams
from helix_serve.model.loader import load_tokenizer
from helix_serve.serving import openai_format
from helix_serve.serving.protocol import EngineChunk, EngineRequest
from helix_serve.serving.step_loop import StepLoop
from tests.model_factory import make_scripted_dir
from tests.test_detokenizer import SPLIT_TOKENS

SCRIPT_TEXT = "café 🙂 ok\n"
NUM_TOKENS = 2 * len(SPLIT_TOKENS)  # the script twice


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> LLMEngine:
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    script = tokenizer.convert_tokens_to_ids(SPLIT_TOKENS)
    path = make_scripted_dir(tmp_path_factory.mktemp("scripted"), tokenizer, script)
    return LLMEngine(EngineConfig(str(path), None, device="cpu", dtype="float32", block_size=4, num_kv_blocks=256,
                                  draft_cost_ratio=0.0, verify_cost_ratio=0.1))


def stream(engine: LLMEngine, sampling: dict) -> list[EngineChunk]:
    """One request through the replica's step loop (the asyncio side and the engine thread), prompt "\\n"."""
    async def run() -> list[EngineChunk]:
        loop = StepLoop(engine)
        queue = loop.open("r")
        await loop.admit([EngineRequest("r", {"ignore_eos": True, "temperature": 0, **sampling}, prompt="\n")])
        chunks = [await queue.get()]
        while not chunks[-1].finished:
            chunks.append(await queue.get())
        return chunks[1:]

    return asyncio.run(run())


def test_logprob_tokens_spell_the_text_and_its_utf8_bytes(engine):
    chunks = stream(engine, {"max_tokens": NUM_TOKENS, "logprobs": 2, "num_speculative_tokens": 3})
    text, logprobs = "".join(c.text for c in chunks), [lp for c in chunks for lp in c.logprobs]
    assert text == SCRIPT_TEXT * 2 and len(logprobs) == NUM_TOKENS
    assert sum(c.num_accepted for c in chunks) > 0  # steps of several tokens (prompt lookup) are among them
    content = openai_format.chat_logprobs(logprobs)["content"]
    tokens = [c["token"] for c in content]
    assert tokens[: len(SPLIT_TOKENS)] == ["c", "af", "", "é", " ", "", "", "", "🙂", " ok", "\n"]
    assert content[3]["bytes"] == [195, 169] and content[2]["bytes"] == []
    assert "".join(tokens) == text and [b for c in content for b in c["bytes"]] == list(text.encode())
    # the chosen token's entry among the alternatives says the same as the token
    assert [c["top_logprobs"][0]["token"] for c in content[2:4]] == ["", "é"]
    legacy = openai_format.completion_logprobs(logprobs)
    offsets = legacy["text_offset"]
    assert offsets == sorted(offsets) and all(text[o : o + len(t)] == t for o, t in zip(offsets, legacy["tokens"]))
    assert max(offsets) < len(text)


def test_token_texts_are_made_on_the_engine_thread(engine, monkeypatch):
    """The tokenizer is not thread-safe and the engine thread uses it: the asyncio side must not."""
    threads = set()
    tokenizer = engine.tokenizer
    for name in ("decode", "batch_decode", "convert_ids_to_tokens"):
        original = getattr(tokenizer, name)

        def record(*args, _original=original, **kwargs):
            threads.add(threading.current_thread().name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(tokenizer, name, record)
    chunks = stream(engine, {"max_tokens": 8, "logprobs": 3})
    assert all(c.logprobs[0].token_id for c in chunks)
    assert threads and all(name.startswith("helix-engine") for name in threads), threads


def test_the_engine_keeps_no_logprobs_between_steps(engine):
    """Logprobs live once: the engine hands each step's out and forgets them; whoever reads the stream keeps
    them (the ingress; `generate` for offline use)."""
    params = SamplingParams(max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=1)
    engine.add_request("\n", params, "kept-once")
    streamed, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            streamed += out.new_logprobs
            final = out if out.finished else final
    assert len(streamed) == NUM_TOKENS and final.logprobs is None
    [generated] = engine.generate(["\n"], params)
    assert generated.logprobs == streamed


def test_a_stop_string_of_bytes_split_over_tokens_ends_at_its_last_byte(engine):
    [out] = engine.generate(["\n"], SamplingParams(max_tokens=NUM_TOKENS, ignore_eos=True, stop=["🙂"]))
    assert out.text == "café " and out.finish_reason == "stop"
    assert engine.tokenizer.convert_ids_to_tokens(out.token_ids) == SPLIT_TOKENS[:9]  # up to 🙂's last byte


def test_per_step_text_and_cache_work_does_not_grow_with_the_output(engine, monkeypatch):
    """A long output with a stop string, penalties, logprobs and prompt lookup: every decode covers a few
    tokens, and each full block is offered to the prefix cache once (before, both went over the history)."""
    windows, offered = [], []
    decode, cache = engine.tokenizer.decode, engine.block_manager.allocator.cache
    monkeypatch.setattr(engine.tokenizer, "decode", lambda ids, **kw: windows.append(len(ids)) or decode(ids, **kw))
    monkeypatch.setattr(engine.block_manager.allocator, "cache", lambda b, h: offered.append(b) or cache(b, h))
    params = SamplingParams(max_tokens=40 * len(SPLIT_TOKENS), ignore_eos=True, stop=["never"], logprobs=1,
                            repetition_penalty=1.1, frequency_penalty=0.1)
    [out] = engine.generate(["\n"], params)
    assert out.text == SCRIPT_TEXT * 40 and len(out.logprobs) == len(out.token_ids)
    assert max(windows) <= 16  # the script's longest pending run (🙂's 4 bytes) plus the context
    assert sorted(offered) == sorted(set(offered)) and len(offered) == (1 + len(out.token_ids)) // 4
