"""The RL trainer (rollout -> score -> update) and its per-batch math."""
