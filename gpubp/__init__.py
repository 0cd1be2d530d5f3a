"""gpubp: fused GPU kernels for training and fine-tuning MLPs, with a NumPy CPU fallback."""

__version__ = "0.1.0"

from gpubp.trace import trace  # noqa: E402

__all__ = ["trace", "__version__"]
