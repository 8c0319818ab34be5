"""The `helix generate` console script, run as a real subprocess; its refusals in-process (`cli.main`, as the
script calls it), which spares a new interpreter's imports (~5 s) per refusal."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from helix_serve.cli import main
from helix_serve.engine.sampling_params import SamplingParams
from tests.helpers import make_engine


def _helix(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("helix", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert exe, "the helix console script is not installed"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


def _refused(capsys, *args: str) -> str:
    """stderr of `helix ARGS`, which must exit with status 2."""
    try:
        code = main(list(args))
    except SystemExit as exit_:  # argparse's refusals
        code = exit_.code
    assert code == 2
    return capsys.readouterr().err


def test_generate_json_matches_engine_greedy(llama_pair):
    target, draft = llama_pair
    proc = _helix("generate", "--target", str(target), "--draft", str(draft), "--dtype", "float32", "--device",
                  "cpu", "--k", "3", "--max-tokens", "12", "--json", "the quick brown")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    [expected] = make_engine(llama_pair).generate(["the quick brown"], SamplingParams(max_tokens=12))
    assert result["token_ids"] == expected.token_ids and result["text"] == expected.text
    assert {"acceptance_rate", "time_to_first_token", "tokens_per_second", "num_drafted"} <= result.keys()


def test_prompt_lookup_method_needs_no_draft_and_gives_the_same_tokens(llama_pair):
    target, _ = llama_pair
    proc = _helix("generate", "--target", str(target), "--method", "ngram", "--dtype", "float32", "--device", "cpu",
                  "--max-tokens", "12", "--json", "--raw", "the quick brown the quick brown")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    [expected] = make_engine(llama_pair).generate(["the quick brown the quick brown"],
                                                  SamplingParams(max_tokens=12, speculative=False))
    assert result["token_ids"] == expected.token_ids and set(result["by_proposer"]) <= {"ngram"}


def test_bad_arguments_fail_clearly(llama_pair, capsys):
    target, draft = llama_pair
    err = _refused(capsys, "generate", "--target", str(target), "--draft", str(draft), "--max-tokens", "0", "hi")
    assert "max_tokens must be >= 1" in err
    assert "invalid choice: 'int8'" in _refused(capsys, "generate", "--target", str(target), "--quantization", "int8",
                                                "the")
    assert "expected 'auto' or an integer >= 0" in _refused(capsys, "generate", "--target", str(target),
                                                             "--int4-dense-rows", "-4", "the")


def test_int4_quantization_flag_reaches_the_engine(llama_pair):
    target, _ = llama_pair
    proc = _helix("generate", "--target", str(target), "--no-speculative", "--quantization", "int4", "--device",
                  "cpu", "--dtype", "float32", "--max-tokens", "10", "--json", "--raw", "the quick brown")
    assert proc.returncode == 0, proc.stderr
    params = SamplingParams(max_tokens=10, speculative=False)
    [expected] = make_engine(llama_pair, quantization="int4").generate(["the quick brown"], params)
    [fp32] = make_engine(llama_pair).generate(["the quick brown"], params)
    assert json.loads(proc.stdout)["token_ids"] == expected.token_ids != fp32.token_ids  # the flag took effect
