"""Randomly initialised Llama models of real shapes, for GPU speed and memory checks (no download).

The shapes are those of SmolLM2-135M, Llama-3.2-1B and Llama-3.1-8B (layers, widths, heads,
vocabulary), and a tiny one for parity and dry runs; the tokenizer is SmolLM2's, whose ids all
fall inside the larger vocabularies. The weights are random, so losses and scores say nothing of
quality: only speed, memory and whether every code path runs. Weights are created on the GPU
when there is one, in bf16.

Run: python benchmarks/gpu/shapes.py SHAPE FOLDER --tokenizer TOKENIZER_FOLDER
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

SHAPES: dict[str, dict[str, object]] = {
    # The test suite's tiny Llama: for the CPU/GPU parity run and dry runs of run.sh.
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
    },
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "rope_theta": 100000.0,
    },
    "llama-3.2-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
    },
    "llama-3.1-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "rope_theta": 500000.0,
    },
}


def write_shape(shape: str, folder: Path, tokenizer_folder: Path, seed: int = 0) -> Path:
    """Save a random bf16 Llama of `shape` with the tokenizer of `tokenizer_folder`."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    config = LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--tokenizer", type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    write_shape(args.shape, args.folder, args.tokenizer)
    print(f"{args.shape}: written to {args.folder} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
