"""pwf_core: probabilistic weight fixing in plain torch (no orchestration imports)."""

__version__ = "0.1.0"
