"""Built-in example models and datasets (digits MLP/CNN, tiny GPT on stdlib text, Gaussian mixtures)."""

from diagnostics.zoo.data import VOCAB, VOCAB_SIZE, decode, encode
from diagnostics.zoo.models import CNNDigits, GPTConfig, MLPDigits, TinyGPT, count_parameters
from diagnostics.zoo.registry import DATASETS, MODELS, get_data, get_loss, get_model

__all__ = [
    # registry
    "MODELS",
    "DATASETS",
    "get_model",
    "get_data",
    "get_loss",
    # models
    "MLPDigits",
    "CNNDigits",
    "GPTConfig",
    "TinyGPT",
    "count_parameters",
    # text vocabulary
    "VOCAB",
    "VOCAB_SIZE",
    "encode",
    "decode",
]
