"""`python -m rlhf_jax.cli ...` is `rlhf-jax ...`."""
import sys

from rlhf_jax.cli.main import main

sys.exit(main())
