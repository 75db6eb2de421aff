"""Run I/O below the trainers: orbax checkpoints (`checkpoint`) and metric sinks (`metrics`)."""
