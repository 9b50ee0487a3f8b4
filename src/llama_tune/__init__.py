"""llama-tune: recipe-driven fine-tuning and distillation of Llama models."""

import logging
import warnings

__version__ = "0.1.0"

# bitsandbytes warns at import that an optional CPU inference kernel (fetched from the Hub) is
# missing; llama-tune keeps 4-bit weights in the training layout, which never uses that kernel.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# peft still calls a transformers property deprecated in 5.x; the warning is not actionable here.
warnings.filterwarnings(
    "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
)
