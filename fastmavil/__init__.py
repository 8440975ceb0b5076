"""fastmavil: masked audio-video pre-training (DiffMAViL) with a plain PyTorch reference path."""
__version__ = "0.1.0"
