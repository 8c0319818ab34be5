"""Incremental text (engine/detokenizer.py, stop_checker.py) against decoding the whole output, as the engine
did before: on SmolLM2's byte-level BPE (characters split over byte tokens) and a SentencePiece-style
tokenizer."""

from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from helix_serve.engine.detokenizer import Detokenizer
from helix_serve.engine.sampling_params import SamplingParams
from helix_serve.engine.sequence import Sequence
from helix_serve.engine.stop_checker import StopChecker
from helix_serve.model.loader import load_tokenizer
from tests.model_factory import CORPUS

# "café 🙂 ok\n" with 'é' and '🙂' as their UTF-8 bytes, one byte-level token each
SPLIT_TOKENS = ["c", "af", "Ã", "©", "Ġ", "ð", "Ł", "Ļ", "Ĥ", "Ġok", "Ċ"]
TEXTS = ["café 🙂 ok", "naïve — 東京 ✓ déjà vu", "ελληνικά and emoji 🎉🎉 end", "plain ascii, nothing else"]


@pytest.fixture(scope="module")
def smollm2() -> PreTrainedTokenizerFast:
    return load_tokenizer("smollm2-135m-instruct")


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def split_ids(tokenizer) -> list[int]:
    return tokenizer.convert_tokens_to_ids(SPLIT_TOKENS)


def chunks(ids: list[int], sizes: list[int]) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = sizes[len(out) % len(sizes)]
        out.append(ids[i : i + n])
        i += n
    return out


@pytest.mark.parametrize("sizes", [[1], [2], [3, 1], [7]])
def test_text_is_the_whole_decode_whatever_the_steps(smollm2, sizes):
    prompt = smollm2("Say it:").input_ids
    outputs = [smollm2(t).input_ids for t in TEXTS] + [split_ids(smollm2) * 2]
    for output in outputs:
        detokenizer, ids, pieces = Detokenizer.after_prompt(len(prompt)), list(prompt), []
        for chunk in chunks(output, sizes):
            ids += chunk
            pieces.append(detokenizer.step(smollm2, ids))
            whole = decode(smollm2, ids[len(prompt) :])
            assert "".join(pieces) == whole.rstrip("\ufffd")  # all but an unfinished character at the end
        assert "".join(pieces) + detokenizer.step(smollm2, ids, final=True) == decode(smollm2, output)


def test_a_character_split_over_tokens_is_emitted_whole_by_its_last_token(smollm2):
    ids = split_ids(smollm2)
    assert smollm2.batch_decode([[i] for i in ids])[2:4] == ["\ufffd", "\ufffd"]  # each byte alone: garbage
    detokenizer, seen, deltas = Detokenizer.after_prompt(0), [], []
    for token in ids:
        seen.append(token)
        deltas.append(detokenizer.step(smollm2, seen))
    assert deltas == ["c", "af", "", "é", " ", "", "", "", "🙂", " ok", "\n"]


def test_ending_inside_a_character_flushes_it_as_the_whole_decode_does(smollm2):
    ids = split_ids(smollm2)[:7]  # "café " and two of 🙂's four bytes
    detokenizer = Detokenizer.after_prompt(0)
    text = detokenizer.step(smollm2, ids)
    assert text == "café "
    assert text + detokenizer.step(smollm2, ids, final=True) == decode(smollm2, ids) == "café \ufffd"


def test_candidates_are_in_context(smollm2):
    """An alternative's text is what it would add where it stands: after a pending 'Ã', '©' adds 'é'."""
    c, af, a_tilde, copyright_sign, space = split_ids(smollm2)[:5]
    detokenizer, ids = Detokenizer.after_prompt(0), [c, af, a_tilde]
    assert detokenizer.step(smollm2, ids) == "caf"
    assert detokenizer.candidates(smollm2, ids, [copyright_sign, space]) == ["é", "\ufffd "]


def sentencepiece_style() -> PreTrainedTokenizerFast:
    """A Metaspace ('▁' for a space) BPE whose decoder drops the space a text starts with, as Llama's does."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def test_sentencepiece_tokens_keep_their_leading_space():
    tokenizer = sentencepiece_style()
    prompt, output = tokenizer("the quick").input_ids, tokenizer(" brown fox jumps").input_ids
    assert [tokenizer.decode([i]) for i in output][:2] == ["brown", "fox"]  # decoded alone: the space is lost
    detokenizer, ids, deltas = Detokenizer.after_prompt(len(prompt)), list(prompt), []
    for token in output:
        ids.append(token)
        deltas.append(detokenizer.step(tokenizer, ids))
    assert "".join(deltas) == " brown fox jumps" and deltas[:2] == [" brown", " fox"]


def old_stop_checker(tokenizer, output: list[int], stops: list[str],
                     steps: list[list[int]]) -> tuple[int, list[str], str]:
    """The engine before issue 31, for reference: decode the whole output after every token, search the text
    near its end, stream what neither ends in '\ufffd' nor could start a stop string. (kept, streamed, text)"""
    ids, streamed, emitted, text = [], [], 0, ""
    for chunk in steps:
        for token in chunk:
            checked = len(text)
            ids.append(token)
            text = decode(tokenizer, ids)
            start = max(0, checked - max(len(s) for s in stops) - 4)
            hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
            if hits:
                text = text[: min(hits)]
                streamed.append(text[emitted:])
                return len(ids), streamed, text
        if len(ids) == len(output):  # finished ("length"): everything goes out
            streamed.append(text[emitted:])
            break
        end = len(text.rstrip("\ufffd"))
        held = max([0] + [n for s in stops for n in range(1, len(s)) if text.endswith(s[:n], 0, end)])
        streamed.append(text[emitted : end - held])
        emitted = end - held
    return len(ids), streamed, text


def test_stop_strings_cut_and_hold_back_text_as_the_whole_decode_did(smollm2):
    """Random stop strings (pieces of the text, multi-byte ones included) and random step sizes: the tokens
    kept, each step's streamed text and the final text equal the old whole-output implementation's."""
    rng = random.Random(0)
    output_text = " ".join(TEXTS + ["café 🙂 ok again, and déjà vu 東京"])
    output = smollm2(output_text).input_ids + split_ids(smollm2)
    checker = StopChecker(smollm2, {smollm2.eos_token_id}, 10_000)
    for trial in range(60):
        stops = []
        for _ in range(rng.randint(1, 3)):
            start = rng.randrange(len(output_text) - 4)
            stops.append(output_text[start : start + rng.randint(1, 4)])
        if trial % 5 == 0:
            stops = ["never in this text"]
        steps = chunks(output, [rng.randint(1, 5) for _ in range(9)])
        seq = Sequence(str(trial), [1], SamplingParams(max_tokens=len(output), stop=stops, ignore_eos=True),
                       torch.Generator())
        streamed, kept = [], 0
        for step in steps:
            kept += checker.append(seq, step)
            if seq.finish_reason:
                checker.flush(seq)
            streamed.append(seq.text.take())
            if seq.finish_reason:
                break
        old_kept, old_streamed, old_text = old_stop_checker(smollm2, output, stops, steps)
        assert (kept, seq.output_text) == (old_kept, old_text), stops
        assert streamed == old_streamed, stops
