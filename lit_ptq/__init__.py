"""lit_ptq: post-training quantization of iTPN vision transformers with PyTorch Lightning."""

__version__ = "0.1.0"
