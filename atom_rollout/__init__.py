"""atom-rollout: the RL rollout engine of ATOM."""
from .engine import EngineConfig, RolloutEngine, RolloutOutput, SampleOutput
from .sampler import SamplingParams

__version__ = "0.1.0"
__all__ = ["EngineConfig", "RolloutEngine", "RolloutOutput", "SampleOutput", "SamplingParams"]
