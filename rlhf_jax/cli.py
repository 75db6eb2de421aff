"""The `rlhf-jax` command line (placeholder until the CLI issue lands)."""
import sys


def main(argv=None) -> int:
    print("rlhf-jax: the CLI and the offline demo are not yet implemented")
    return 0


if __name__ == "__main__":
    sys.exit(main())
