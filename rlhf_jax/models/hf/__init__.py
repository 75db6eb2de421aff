"""HF checkpoints in and out: safetensors I/O, the name tables per family, `from_pretrained`
and `save_pretrained` (pretrained.py); GGUF files as a tensor source for `from_pretrained` (gguf.py)."""
