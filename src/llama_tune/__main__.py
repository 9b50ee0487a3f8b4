"""`python -m llama_tune` runs the CLI, so `accelerate launch -m llama_tune` works."""

from llama_tune.cli import console

raise SystemExit(console())
