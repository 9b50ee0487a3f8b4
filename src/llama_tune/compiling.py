"""torch.compile for training (`model.compile`): each decoder layer compiled on its own, as
torchtune and torchtitan do. The layers share one compiled graph (their weights are inputs to
it, not constants baked in), so compiling costs one layer's worth, not thirty; the embedding,
the head at the answer positions, the loss and the loop stay eager.

On a CPU, packed rows' attention is one custom operator inside the graph (`packed_kernel`;
elsewhere it runs eagerly between the graph's pieces), and the fused LoRA modules share one
class (`lora_fusion.FusedLoraLinear`), so the layers share the graph. On this project's 2-core
Xeon with AMX, bf16, the compiled layers train SST-2 rows 1.35x faster after a compile of
about half a minute (docs/BENCHMARKS.md); torch keeps the compiled code in its cache on disk,
so a second run of the same model compiles in seconds.
"""

from __future__ import annotations

from transformers import PreTrainedModel


def compile_layers(model: PreTrainedModel) -> None:
    """Compile each decoder layer of the causal LM `model` in place.

    Shapes are dynamic from the start: every step's rows have another length, and a graph
    specialised to the first step's would be compiled again at the second."""
    for layer in model.model.layers:
        layer.compile(dynamic=True)
