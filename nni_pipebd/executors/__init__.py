"""Executors (reference, dp, ...), their registry and the launcher; the only code that uses torch.distributed."""
