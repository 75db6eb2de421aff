"""Evaluation: batched pass@k of one or more models on a prompt set, with bootstrap CIs and plots."""
