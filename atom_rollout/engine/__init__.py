"""The engine: sequences, blocks, scheduling, execution and the front ends."""
from .config import EngineConfig
from .core import EngineCore
from .outputs import RolloutOutput, SampleOutput
from .rollout_engine import RolloutEngine

__all__ = ["EngineConfig", "EngineCore", "RolloutEngine", "RolloutOutput", "SampleOutput"]
