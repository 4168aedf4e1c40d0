"""Resolve a checkpoint's ``architectures`` entry to a model builder."""
from __future__ import annotations

from .decoder import DecoderForCausalLM, DecoderSpec
from .mtp import MTPStack, num_mtp_layers

# architecture -> (qkv bias, per-head q/k RMSNorm)
_FAMILIES = {
    "LlamaForCausalLM": (False, False),
    "MistralForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": (False, True),
}

SUPPORTED_ARCHITECTURES = tuple(sorted(_FAMILIES))


def build_model(hf_config) -> DecoderForCausalLM:
    architectures = getattr(hf_config, "architectures", None) or []
    for arch in architectures:
        if arch in _FAMILIES:
            qkv_bias, qk_norm = _FAMILIES[arch]
            _reject_unsupported_options(hf_config, arch)
            model = DecoderForCausalLM(DecoderSpec.from_hf(hf_config, qkv_bias, qk_norm),
                                       hf_config)
            if num_mtp_layers(hf_config):
                model.mtp = MTPStack(model.spec, num_mtp_layers(hf_config)).requires_grad_(False)
            return model
    raise ValueError(f"architectures: {architectures!r} is not supported; "
                     f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def _reject_unsupported_options(hf_config, arch: str) -> None:
    for option in ("attention_bias", "mlp_bias"):
        if arch == "LlamaForCausalLM" and getattr(hf_config, option, False):
            raise ValueError(f"{option}: biases on LlamaForCausalLM projections are not supported")
