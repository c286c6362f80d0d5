r"""Exports the best checkpoint of a run as a portable inference artifact.

  python -m experiments.export --workdir=/tmp/sasrec_ml1m --out=/tmp/sasrec_artifact \
      [--top_k=100] [--max_len=200] [--platforms=cpu,cuda]

The artifact (``jax.export`` StableHLO of the top-K function, the parameters
beside it, the item-id and user-id maps, ``manifest.json``) loads with
``deeprec_jax.serving.load(DIR)``, which needs only jax and numpy; serve it
with ``python -m experiments.serve``. Runs with an image item encoder also
store the catalogue's item vectors, computed once here, which the function
scores against (no image tower per request). See docs/serving.md.
"""

import json

from absl import app, flags

from deeprec_jax.serving import exporter
from experiments import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory written by experiments.train.",
                               required=True)
_OUT = flags.DEFINE_string("out", None, "Artifact directory to write.", required=True)
_TOP_K = flags.DEFINE_integer("top_k", exporter.DEFAULT_TOP_K,
                              "Largest k served (capped at the catalogue size).")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "Input length, at most the run's "
                                "data.max_len (default: the run's; Caser: its window).")
_PLATFORMS = flags.DEFINE_list("platforms", list(exporter.DEFAULT_PLATFORMS),
                               "Platforms to lower for; falls back to cpu if lowering fails.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  manifest = exporter.export_workdir(_WORKDIR.value, _OUT.value, top_k=_TOP_K.value,
                                     max_len=_MAX_LEN.value, platforms=_PLATFORMS.value)
  print(json.dumps({"artifact": _OUT.value, **{key: manifest[key] for key in (
      "model", "task", "step", "platforms", "top_k", "max_len", "needs_user", "config_hash")}}))


if __name__ == "__main__":
  cli.run(main)
