"""The `rlhf-jax` command line: argv (`main`), YAML configs (`config`, `yaml_config`), run folders
(`run_folder`) and the commands that wire data, models and drivers (`commands`).

Nothing in the library imports this package.
"""
