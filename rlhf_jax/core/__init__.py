"""Array math: masked ops, losses, advantage estimators, KL, reward shaping, pass@k.

Nothing here sees a model or touches a file: every function is a pure, jittable map of
arrays (``[B, T]`` token arrays with an explicit ``mask``), so a research loop can copy
any one of them. The public names are re-exported as ``rlhf_jax.<name>``.
"""
