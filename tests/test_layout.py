"""The optimizer every layout steps: torch's AdamW, fused where the kernel exists; the loss
scale every layout saves."""

from types import SimpleNamespace

import torch

from llama_tune import layout, runtime
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


def test_a_zero_runs_loss_scale_carries_its_scale_to_a_grad_scaler() -> None:
    # A ZeRO fp16 checkpoint resumed under DDP: DeepSpeed's counters mean nothing to a
    # GradScaler, its scale does; a GradScaler's own state comes back whole.
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=2)
    accelerator = SimpleNamespace(scaler=scaler)
    counters = {"cur_scale": 512.0, "cur_iter": 9, "last_overflow_iter": 3, "cur_hysteresis": 2}
    from_zero = {"scale": 512.0, "deepspeed": counters}
    layout.Layout().load_loss_scale(accelerator, None, from_zero)
    assert scaler.state_dict()["scale"] == 512.0
    assert scaler.state_dict()["growth_interval"] == 2
    own = scaler.state_dict() | {"scale": 64.0, "_growth_tracker": 1}
    layout.Layout().load_loss_scale(accelerator, None, own)
    assert layout.Layout().loss_scale(accelerator, None) == own
    layout.Layout().load_loss_scale(SimpleNamespace(scaler=None), None, own)


def test_the_accelerator_waits_an_hour_for_a_late_process() -> None:
    # Whichever makes the process group first, process_state or the Accelerator, sets it.
    accelerator = layout.Layout().accelerator()
    assert accelerator.init_handler.timeout == runtime.PROCESS_GROUP_TIMEOUT
