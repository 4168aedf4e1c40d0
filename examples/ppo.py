"""PPO on the rollout engine: the GRPO loop of examples/grpo.py with a value head on the
policy's last hidden state and GAE advantages (reward on the last token). Same options.

    python examples/ppo.py --model atom_rollout/rl/demo_model --steps 30 --lr 0.05 --optimizer sgd
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # integrations/

from atom_rollout.rl.cli import main  # noqa: E402

if __name__ == "__main__":
    main("ppo")
