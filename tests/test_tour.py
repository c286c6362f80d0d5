"""The README's tour runs as written (on ML-100K, with fewer steps), so it cannot drift.

``test_the_readme_tour_runs`` (slow: ~1.5 min) runs each ``python -m``
command of the tour's code block in a subprocess with three changes only:
``/tmp/`` becomes a test folder, training gets a few steps
(``--config.train.num_steps``, small ``max_len`` and width), the sweep is a
``--dry_run`` and the benchmark only prints its flags (``--helpshort``): the
benchmarks have their own tests. The default suite checks the tour's
consistency without running it.
"""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from experiments.configs import default

REPO = pathlib.Path(__file__).resolve().parents[1]
_FAST = {
    "experiments.train": ["--config.train.num_steps=3", "--config.train.eval_every_epochs=1",
                          "--config.data.max_len=10", "--config.model.dim=8",
                          "--config.eval.num_sampled_negatives=5"],
    "experiments.ablate": ["--dry_run"],
    "benchmarks.run": ["--helpshort"],
}

_NEEDS_ML100K = pytest.mark.skipif(
    not os.path.isdir(os.path.join(default.SHARED_DATA, "ml-100k")),
    reason=f"MovieLens-100K not found under {default.SHARED_DATA}")


def tour_commands() -> list[str]:
  """The shell lines of the README's tour block, continuation lines joined."""
  readme = (REPO / "README.md").read_text(encoding="utf-8")
  section = readme[readme.index("## A short tour"):]
  block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
  lines = [line for line in block.replace("\\\n", " ").splitlines()
           if line.strip() and not line.lstrip().startswith("#")]
  return [re.sub(r"\s+#.*$", "", line).strip() for line in lines]


def test_every_tour_command_names_a_module_config_and_trained_workdir():
  trained = set()
  for command in tour_commands():
    if command.startswith("printf "):
      continue
    args = shlex.split(command)
    module = args[2]
    assert (REPO / (module.replace(".", "/") + ".py")).exists(), command
    flags = dict(arg[2:].split("=", 1) for arg in args[3:] if "=" in arg)
    if "config" in flags:
      assert (REPO / flags["config"].split(":")[0]).exists(), command
    if module == "experiments.train":
      trained.add(flags["workdir"])
    elif module in ("experiments.evaluate", "experiments.recommend"):
      assert flags["workdir"] in trained, f"{command}: the tour never trains that workdir"


@pytest.mark.slow
@_NEEDS_ML100K
def test_the_readme_tour_runs(tmp_path):
  commands = tour_commands()
  assert sum(c.startswith("python -m experiments.train") for c in commands) == 2
  outputs = {}
  for command in commands:
    command = command.replace("/tmp/", f"{tmp_path}/")
    if command.startswith("printf "):
      subprocess.run(command, shell=True, check=True)
      continue
    args = shlex.split(command)
    assert args[:2] == ["python", "-m"], command
    module = args[2]
    result = subprocess.run([sys.executable, *args[1:], *_FAST.get(module, [])], cwd=REPO,
                            capture_output=True, text=True, timeout=400, check=False)
    # absl exits with 1 after printing --helpshort.
    expected = 1 if "--helpshort" in _FAST.get(module, []) else 0
    assert result.returncode == expected, f"{command}\n{result.stderr[-3000:]}"
    outputs[command] = result.stdout
  recommendations = [out for command, out in outputs.items() if "experiments.recommend" in command]
  assert len(recommendations) == 3
  assert all('"recommendations"' in out for out in recommendations)
  assert len(recommendations[1].strip().splitlines()) == 2  # Both lines of the file.
