"""OpenAI-compatible HTTP server with RL endpoints (`atom-rollout serve MODEL_DIR`)."""
from .app import build_app

__all__ = ["build_app"]
