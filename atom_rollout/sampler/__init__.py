"""Sampling: parameters, logits processing, per-row noise, token draws."""
from .params import SamplingParams
from .processing import processed_logprobs
from .sampler import SamplerOutput, SamplingTensors, sample

__all__ = ["SamplerOutput", "SamplingParams", "SamplingTensors", "processed_logprobs", "sample"]
