"""Blockwise distillation: losses, path samplers, one block's training step."""
