"""hybrid_ds: pipeline + data + ZeRO parallel training of Hugging Face models on DeepSpeed."""

__version__ = "0.1.0"
