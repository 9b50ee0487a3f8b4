"""The optimizer every layout steps: torch's AdamW, fused where the kernel exists."""

import torch

from llama_tune.layout import adamw


def _weights(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(64, 32), (32,), (8, 64)]
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]


def test_adamw_on_the_cpu_is_fused_and_steps_as_the_loop_does():
    fused_weights, loop_weights = _weights(0), _weights(0)
    fused = adamw(fused_weights, lr=1e-2, weight_decay=0.1)
    loop = torch.optim.AdamW(loop_weights, lr=1e-2, weight_decay=0.1)
    assert fused.defaults["fused"]
    assert not loop.defaults["fused"]
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        for fused_weight, loop_weight in zip(fused_weights, loop_weights, strict=True):
            gradient = torch.randn(fused_weight.shape, generator=generator)
            fused_weight.grad, loop_weight.grad = gradient.clone(), gradient.clone()
        fused.step()
        loop.step()
    starts = _weights(0)
    for fused_weight, loop_weight, start in zip(fused_weights, loop_weights, starts, strict=True):
        assert not torch.equal(fused_weight, start)
        torch.testing.assert_close(fused_weight, loop_weight, rtol=1e-5, atol=1e-6)


def test_adamw_falls_back_to_the_loop_off_the_fused_devices():
    weights = [torch.nn.Parameter(torch.zeros(4, device="meta"))]
    assert not adamw(weights, lr=1e-3).defaults["fused"]
