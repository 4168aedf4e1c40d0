"""GRPO on the rollout engine: n samples per prompt, group-normalised advantages, the
clipped objective against the engine's (processed) logprobs, new weights every step.

    python examples/grpo.py --model atom_rollout/rl/demo_model --steps 30 --out-dir runs/grpo
    python examples/grpo.py --model DIR --sync broadcast   # engine in another process

--sync inprocess: engine in this process, engine.update_weights(model.named_parameters());
--sync broadcast: engine in a child process, WeightSender -> receive_weights (Gloo on CPU,
NCCL on GPU; with NCCL put the engine on another GPU: --engine-device cuda:1);
--sync ipc: engine in a child process on the same GPU, CUDA IPC buckets.
--ray (with --sync broadcast): engine in integrations/ray_worker.py's RolloutWorker.
The loop itself is atom_rollout/rl (shared with examples/ppo.py and `atom-rollout demo`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # integrations/

from atom_rollout.rl.cli import main  # noqa: E402

if __name__ == "__main__":
    main("grpo")
