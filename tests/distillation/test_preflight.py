"""Tokenizer compatibility and the memory estimate, before any weights load."""

from __future__ import annotations

import copy

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from llama_tune.distillation import preflight


def _word_level(vocab: dict[str, int]) -> PreTrainedTokenizerFast:
    model = WordLevel(vocab, unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(model), unk_token="<unk>")


def test_the_same_tokenizer_is_compatible(tokenizer) -> None:
    preflight.check_tokenizers(tokenizer, copy.deepcopy(tokenizer))


def test_extra_tokens_and_special_tokens_are_named(tokenizer) -> None:
    student = copy.deepcopy(tokenizer)
    student.add_tokens(["<|student-only|>"])
    student.eos_token = "<|im_start|>"
    problems = preflight.tokenizer_differences(tokenizer, student)
    assert problems == [
        "tokens only the student has: '<|student-only|>'",
        f"eos_token: teacher {tokenizer.eos_token!r}, student '<|im_start|>'",
    ]


def test_same_size_different_ids_is_refused() -> None:
    teacher = _word_level({"<unk>": 0, "good": 1, "bad": 2})
    student = _word_level({"<unk>": 0, "good": 2, "bad": 1})
    with pytest.raises(preflight.IncompatibleTokenizers) as caught:
        preflight.check_tokenizers(teacher, student)
    assert "tokens with different ids (teacher vs student): \"'bad': 2 vs 1\"" in str(caught.value)


def test_memory_estimate_counts_weights_and_optimizer(tiny_model_dir) -> None:
    parameters = preflight.parameter_count(str(tiny_model_dir))
    # Tied embeddings, and per layer: q and o (64x64), k and v (64x32), MLP, two norms.
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
    assert parameters == 49152 * 64 + 2 * per_layer + 64
    estimate = preflight.estimate_memory(1000, 2, 500, 4, 100)
    assert estimate.total == 2000 + 2000 + 1200
    assert "GiB" in estimate.describe()
