"""Model FLOPs of LoRA training on a Llama, for model FLOPs utilisation (MFU).

The count is the work the loss needs, the same for every trainer compared, so MFU ratios equal
throughput ratios:
- every decoder layer for every input token; a frozen weight costs 4 FLOPs per token (forward
  and input gradient; no weight gradient), the LoRA factors are left out (under 1%);
- attention scores and mixing, 4 * width FLOPs per token per key in the forward, not halved for
  the causal mask, times 3 with its backward;
- the output head for target tokens only, 4 FLOPs per weight (the loss needs no other position).
"""

from __future__ import annotations

import time

import torch
from transformers import PretrainedConfig

from llama_tune import runtime

H200_BF16_DENSE_TFLOPS = 989.4
"""NVIDIA's dense bf16 Tensor Core peak of the H100/H200 SXM (without sparsity)."""


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def decoder_weights(config: PretrainedConfig) -> int:
    """Weights of the matrix products in the decoder layers (attention and MLP projections)."""
    width, ffn = config.hidden_size, config.intermediate_size
    query_width = config.num_attention_heads * _head_dim(config)
    key_value_width = config.num_key_value_heads * _head_dim(config)
    attention = width * (query_width + 2 * key_value_width) + query_width * width
    return config.num_hidden_layers * (attention + 3 * width * ffn)


def lora_training_flops(
    config: PretrainedConfig, input_tokens: int, target_tokens: int, mean_length: float
) -> float:
    """FLOPs of LoRA training steps over these tokens (see the module docstring)."""
    layers = 4 * decoder_weights(config) * input_tokens
    width = config.num_attention_heads * _head_dim(config)
    attention = 3 * 4 * width * mean_length * config.num_hidden_layers * input_tokens
    head = 4 * config.hidden_size * config.vocab_size * target_tokens
    return float(layers + attention + head)


def measured_matmul_tflops(
    size: int = 8192,
    seconds: float = 3.0,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
) -> float:
    """TFLOP/s of a square matrix product on `device` in `dtype`: the ceiling seen in practice
    (on the CPU, with the threads this process has). The best quarter-second window over
    `seconds` after a warm-up: one short burst varied 1.0-2.5 TFLOP/s between processes on the
    AMX Xeon (clock and power states), the best window of three seconds 2.33-2.43."""
    left = torch.randn(size, size, device=device, dtype=dtype)
    right = torch.randn(size, size, device=device, dtype=dtype)

    def wait() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        left @ right
    wait()
    best, finish = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < finish:
        started, products = time.perf_counter(), 0
        while products == 0 or time.perf_counter() - started < 0.25:
            left @ right
            products += 1
            wait()
        best = max(best, 2 * size**3 * products / (time.perf_counter() - started))
    return best / 1e12


def cpu_matmul_gflops(precision: str) -> float:
    """Sustained GFLOP/s of `precision` (fp32 or bf16) matrix products on this CPU (2048^3, the
    best quarter second of three): the denominator of the CPU's model FLOPs utilisation."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    return 1000 * measured_matmul_tflops(2048, 3.0, "cpu", dtype)


def slow_bf16_here(precision: str) -> bool:
    """True, with a line saying so, for bf16 on a CPU without native bf16 (AVX512-BF16, AMX):
    PyTorch emulates it there, dozens of times slower than fp32, so the figures would measure
    the emulation rather than either system."""
    if precision != "bf16" or torch.cuda.is_available() or runtime.cpu_has_native_bf16():
        return False
    print("skipped: bf16 on this CPU (no AVX512-BF16 or AMX) measures PyTorch's emulation")
    return True
