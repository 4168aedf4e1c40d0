"""Model families, their shared layers, and the HF-name weight mapping."""
from .decoder import DecoderForCausalLM, DecoderSpec
from .loader import (WeightMap, canonical_name, init_dummy_weights, iter_checkpoint,
                     load_checkpoint)
from .registry import SUPPORTED_ARCHITECTURES, build_model

__all__ = ["DecoderForCausalLM", "DecoderSpec", "SUPPORTED_ARCHITECTURES", "WeightMap",
           "build_model", "canonical_name", "init_dummy_weights", "iter_checkpoint",
           "load_checkpoint"]
