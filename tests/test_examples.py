"""The README's hand-composed PPO loop runs and raises its programmatic reward."""
import runpy
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_ppo_loop.py"


def test_readme_example_is_the_example_file():
    readme = (EXAMPLE.parents[1] / "README.md").read_text()
    body = EXAMPLE.read_text().split("\n", 1)[1].strip()  # without the module docstring
    assert body in readme, "README's custom-loop example differs from examples/custom_ppo_loop.py"


def test_custom_ppo_loop_learns():
    namespace = runpy.run_path(str(EXAMPLE), run_name="example")
    history = namespace["history"]
    assert len(history) == 30
    assert max(history[:3]) < 0.15          # token 5 is rare under the random policy
    assert sum(history[-5:]) / 5 > 0.25     # and PPO makes it common
