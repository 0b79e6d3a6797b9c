"""bico: Bidirectional Causal language model Optimization (Lv et al., arXiv 2311.07468).

Fine-tunes Llama-family causal LMs with bidirectional-RoPE attention and autoregressive mask
denoising, so that a model trained on "A is B" can also answer "B is ?" (the reversal curse).
"""

from .attention import bico_attention
from .collators import BicoCollator, NtpCollator
from .evaluation import evaluate
from .patch import bidirectional, patch_llama, unpatch_llama
from .trainer import BicoTrainer, BicoTrainerMixin
from .training import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "patch_llama",
    "unpatch_llama",
    "bidirectional",
    "bico_attention",
    "BicoCollator",
    "NtpCollator",
    "BicoTrainer",
    "BicoTrainerMixin",
    "TrainConfig",
    "train",
    "evaluate",
]
