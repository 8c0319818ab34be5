"""The replica's continuous-batching step loop, in-process (no Ray): joining, leaving, rejecting."""

from __future__ import annotations

import asyncio

import pytest

from helix_serve.config import EngineConfig
from helix_serve.engine.llm_engine import LLMEngine
from helix_serve.engine.sampling_params import SamplingParams
from helix_serve.serving.protocol import EngineChunk, EngineRequest
from helix_serve.serving.step_loop import DuplicateRequestError, StepLoop, batched

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def engine(llama_pair) -> LLMEngine:
    target, draft = llama_pair
    return LLMEngine(EngineConfig(str(target), str(draft), device="cpu", dtype="float32", num_kv_blocks=64))


async def _run(loop: StepLoop, request: EngineRequest) -> list[EngineChunk]:
    queue = loop.open(request.request_id)
    await loop.admit([request])
    chunks = [await queue.get()]
    while not chunks[-1].finished:
        chunks.append(await queue.get())
    return chunks


def test_chunks_add_up_to_the_engine_result(engine):
    request = EngineRequest("r", {"max_tokens": 30, "ignore_eos": True}, prompt=PROMPT)
    chunks = asyncio.run(_run(StepLoop(engine), request))
    (expected,) = engine.generate([PROMPT], SamplingParams(max_tokens=30, ignore_eos=True))
    admission, steps = chunks[0], chunks[1:]
    assert admission.status_code is None and admission.num_prompt_tokens == len(engine.tokenizer(PROMPT).input_ids)
    assert len(steps) > 1 and steps[-1].stats["tokens_generated"] == 30
    assert "".join(c.text for c in steps) == expected.text
    assert [t for c in steps for t in c.token_ids] == expected.token_ids


def test_a_slow_consumer_gets_the_waiting_chunks_in_one_message_and_nothing_lost(engine):
    async def scenario() -> tuple[list[list[EngineChunk]], int]:
        steps = []  # every engine step that produced output
        loop = StepLoop(engine, on_step=steps.append)
        queue = loop.open("slow")
        sampling = {"max_tokens": 40, "ignore_eos": True, "logprobs": 1}
        await loop.admit([EngineRequest("slow", sampling, prompt=PROMPT)])
        while "slow" in loop._streams:  # a reader that comes back only after the whole generation
            await asyncio.sleep(0.01)
        return [m async for m in batched(queue)], len(steps)

    messages, num_steps = asyncio.run(scenario())
    (expected,) = engine.generate([PROMPT], SamplingParams(max_tokens=40, ignore_eos=True))
    (message,) = messages  # everything that waited, in one message, each chunk still one engine step
    admission, steps = message[0], message[1:]
    assert admission.num_prompt_tokens > 0 and not admission.token_ids and len(steps) == num_steps > 2
    assert steps[-1].finished and not any(c.finished for c in steps[:-1])
    assert [t for c in steps for t in c.token_ids] == expected.token_ids
    assert "".join(c.text for c in steps) == expected.text and sum(len(c.logprobs) for c in steps) == 40
    assert all(len(c.step_ks) <= 1 for c in steps)
    assert sum(c.num_drafted for c in steps) == steps[-1].stats["num_drafted"] \
        == sum(k for c in steps for k in c.step_ks)
    assert sum(c.num_accepted for c in steps) == steps[-1].stats["num_accepted"]


def test_tokens_are_handed_over_at_most_every_stream_interval_but_the_first_at_once(engine):
    async def scenario(interval: float) -> list[list[EngineChunk]]:
        loop = StepLoop(engine, stream_interval_s=interval)
        queue = loop.open("r")
        await loop.admit([EngineRequest("r", {"max_tokens": 200, "ignore_eos": True}, prompt=PROMPT)])
        return [m async for m in batched(queue)]

    held = asyncio.run(scenario(interval=60.0))
    (expected,) = engine.generate([PROMPT], SamplingParams(max_tokens=200, ignore_eos=True))
    chunks = [c for m in held for c in m]
    assert chunks[0].num_prompt_tokens > 0 and not chunks[0].token_ids and chunks[1].token_ids  # admission, first
    assert [t for c in chunks for t in c.token_ids] == expected.token_ids and chunks[-1].finished
    # The first tokens went at once (held 60 s they would have come with the end), every later step with the end.
    with_first = next(i for i, m in enumerate(held) if any(c.token_ids for c in m))
    assert len(held) == with_first + 2 and not any(c.finished for c in held[with_first]) and len(held[-1]) > 1
    every_step = asyncio.run(scenario(interval=0.0))
    assert len(every_step) > 3 and [t for m in every_step for c in m for t in c.token_ids] == expected.token_ids


def test_a_closed_streams_held_chunks_never_reach_a_new_request_with_its_id(engine):
    async def scenario() -> list[EngineChunk]:
        loop = StepLoop(engine, stream_interval_s=60.0)  # everything after the first tokens is held
        queue = loop.open("same")
        await loop.admit([EngineRequest("same", {"max_tokens": 300, "ignore_eos": True}, prompt=PROMPT)])
        await queue.get()  # admission
        await queue.get()  # the first tokens; later steps wait in the engine thread's outbox
        while len(loop._outbox) < 5:
            await asyncio.sleep(0.005)
        loop.close("same")
        return await _run(loop, EngineRequest("same", {"max_tokens": 5, "ignore_eos": True}, prompt=PROMPT))

    chunks = asyncio.run(scenario())
    (expected,) = engine.generate([PROMPT], SamplingParams(max_tokens=5, ignore_eos=True))
    assert chunks[0].num_prompt_tokens > 0 and chunks[-1].finished and chunks[-1].stats["tokens_generated"] == 5
    assert [t for c in chunks for t in c.token_ids] == expected.token_ids


def test_a_failing_engine_call_reaches_its_caller_and_the_engine_thread_goes_on(engine):
    async def scenario() -> list[EngineChunk]:
        loop = StepLoop(engine)
        with pytest.raises(ZeroDivisionError):
            await loop.run_on_engine(lambda: 1 / 0)
        loop._submit(lambda: 1 / 0)  # a failing call with no caller: logged, the thread keeps serving
        return await _run(loop, EngineRequest("after", {"max_tokens": 5, "ignore_eos": True}, prompt=PROMPT))

    chunks = asyncio.run(scenario())
    assert chunks[-1].finished and sum(len(c.token_ids) for c in chunks) == 5


def test_a_message_keeps_each_chunk_as_it_was_and_ends_with_the_finished_one():
    async def scenario() -> list[list[EngineChunk]]:
        queue: asyncio.Queue[EngineChunk] = asyncio.Queue()
        chunks = (EngineChunk("e", num_prompt_tokens=3), EngineChunk("e", "x", [0]),
                  EngineChunk("e", "a", [1], 2, 1, [2]),
                  EngineChunk("e", finished=True, error="boom", status_code=503), EngineChunk("e", "late", [9]))
        for chunk in chunks:
            queue.put_nowait(chunk)
        return [m async for m in batched(queue)]

    (message,) = asyncio.run(scenario())
    assert [c.text for c in message] == ["", "x", "a", ""]
    assert message[2].step_ks == [2] and message[2].num_accepted == 1
    assert message[-1].error == "boom" and message[-1].status_code == 503  # nothing after the finished chunk


def test_a_short_request_joins_and_leaves_before_a_long_one(engine):
    async def scenario() -> list[str]:
        loop, done = StepLoop(engine), []
        long_queue = loop.open("long")
        await loop.admit([EngineRequest("long", {"max_tokens": 300, "ignore_eos": True}, prompt=PROMPT)])
        await long_queue.get()  # admission
        await long_queue.get()  # the long one is generating

        async def drain_long() -> None:
            while not (await long_queue.get()).finished:
                pass
            done.append("long")

        long = asyncio.create_task(drain_long())
        await _run(loop, EngineRequest("short", {"max_tokens": 5, "ignore_eos": True}, prompt=PROMPT))
        done.append("short")
        await long
        return done

    assert asyncio.run(scenario()) == ["short", "long"]


def test_closing_a_stream_aborts_and_frees_its_blocks(engine):
    async def scenario() -> tuple[int, int]:
        loop = StepLoop(engine)
        queue = loop.open("gone")
        await loop.admit([EngineRequest("gone", {"max_tokens": 300, "ignore_eos": True}, prompt=PROMPT)])
        await queue.get()  # admission
        await queue.get()  # first step
        used_while_running = (await loop.run_on_engine(engine.kv_usage))["used_blocks"]
        loop.close("gone")
        used_after = (await loop.run_on_engine(engine.kv_usage))["used_blocks"]
        return used_while_running, used_after

    running, after = asyncio.run(scenario())
    assert running > 0 and after == 0 and not engine.has_unfinished_requests()


@pytest.mark.parametrize(("prompt", "sampling", "status", "needle"), [
    ("fox " * 600, {"max_tokens": 4}, 413, "context"),
    (PROMPT, {"max_tokens": 4000}, 400, "max_tokens"),
    (PROMPT, {"max_tokens": 4, "num_speculative_tokens": 99}, 400, "num_speculative_tokens"),
    (PROMPT, {"max_tokens": 4, "top_p": 0.0}, 400, "top_p"),
])
def test_rejections_come_back_as_an_admission_chunk(engine, prompt, sampling, status, needle):
    (chunk,) = asyncio.run(_run(StepLoop(engine), EngineRequest("bad", sampling, prompt=prompt)))
    assert chunk.finished and chunk.status_code == status and needle in chunk.error


def test_chat_messages_use_the_fallback_template(engine):
    messages = [{"role": "user", "content": "hello"}]
    chunks = asyncio.run(_run(StepLoop(engine), EngineRequest("chat", {"max_tokens": 3}, messages=messages)))
    expected = len(engine.tokenizer("user: hello\nassistant:", add_special_tokens=False).input_ids)
    assert chunks[0].num_prompt_tokens == expected and chunks[-1].finished


def test_a_running_request_id_cannot_be_reused(engine):
    async def scenario() -> None:
        loop = StepLoop(engine)
        loop.open("same")
        with pytest.raises(DuplicateRequestError):
            loop.open("same")
        loop.close("same")

    asyncio.run(scenario())
