"""The packed attention operator computes what one SDPA call per example computes, forward and
backward, and is a well-formed torch operator (the private CPU flash-attention kernels it calls
are checked here: a torch that changes them fails these tests)."""

from __future__ import annotations

import pytest
import torch

from llama_tune.packed_kernel import SHORT_ROWS, packed_attention

EXAMPLE_LENGTHS = [(7, 12, SHORT_ROWS + 9, 1, 5), (10, 3, SHORT_ROWS + 15, 3, 3)]
SCALE = 0.125


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Two packed rows of different examples, 6 query heads over 2 key heads, as transformers
    lays them out ([batch, heads, length, dim] views of [batch, length, heads, dim])."""
    length = sum(EXAMPLE_LENGTHS[0])
    assert sum(EXAMPLE_LENGTHS[1]) == length
    generator = torch.Generator().manual_seed(0)

    def states(heads: int) -> torch.Tensor:
        values = torch.randn(2, length, heads, 16, generator=generator).to(dtype)
        return values.transpose(1, 2).requires_grad_()

    position_ids = torch.stack(
        [torch.cat([torch.arange(size) for size in sizes]) for sizes in EXAMPLE_LENGTHS]
    )
    return states(6), states(2), states(2), position_ids


def _per_example_sdpa(query, key, value, fp32_short: bool) -> torch.Tensor:
    rows = []
    for row, sizes in enumerate(EXAMPLE_LENGTHS):
        pieces = []
        for example in zip(
            *(states[row : row + 1].split(sizes, dim=2) for states in (query, key, value)),
            strict=True,
        ):
            dtype = torch.float32 if fp32_short and example[0].shape[2] <= SHORT_ROWS else None
            attended = torch.nn.functional.scaled_dot_product_attention(
                *(states.to(dtype or states.dtype) for states in example),
                is_causal=True,
                scale=SCALE,
                enable_gqa=True,
            )
            pieces.append(attended.transpose(1, 2).to(query.dtype))
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_attention_equals_sdpa_per_example(dtype: torch.dtype) -> None:
    # bf16 rows attend in fp32 up to SHORT_ROWS tokens, in bf16 beyond: both kinds are here.
    query, key, value, position_ids = _inputs(dtype)
    fp32_short = dtype == torch.bfloat16
    output_grad = torch.randn(query.shape[0], query.shape[2], *query.shape[1:2], 16).to(dtype)
    attended, _ = packed_attention(query, key, value, position_ids, SCALE, dtype, fp32_short)
    attended = attended.to(dtype)
    gradients = torch.autograd.grad(attended, (query, key, value), output_grad)
    expected = _per_example_sdpa(query, key, value, fp32_short)
    expected_gradients = torch.autograd.grad(expected, (query, key, value), output_grad)
    assert attended.shape == expected.shape == (2, query.shape[2], 6, 16)
    torch.testing.assert_close(attended, expected, rtol=0, atol=0)
    for gradient, expected_gradient, states in zip(
        gradients, expected_gradients, (query, key, value), strict=True
    ):
        assert gradient.shape == states.shape
        torch.testing.assert_close(gradient, expected_gradient, rtol=0, atol=0)


def test_packed_attention_is_a_well_formed_operator() -> None:
    # Fake tensors (what torch.compile traces with), the autograd registration and the schema.
    query, key, value, position_ids = _inputs(torch.float32)
    torch.library.opcheck(
        packed_attention, (query, key, value, position_ids, SCALE, torch.float32, False)
    )
