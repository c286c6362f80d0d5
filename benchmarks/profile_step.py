r"""Per-op profile of one family's ML-1M train step: where its time goes.

  python -m benchmarks.profile_step --model=bert4rec --out=/tmp/profile

Compiles ``kernels.train_step_kernel(model)`` (the ``train_step`` group's
step), profiles a few calls (``opprofile.profile``) and prints the busy time
per component and pass, and the most expensive instructions. Writes
``<out>/profile_<model>.json`` with the same figures and the load average.
Busy times are summed over XLA's threads: on 2 cores about twice the wall time.
"""

import json
import os

from absl import app, flags

from benchmarks import groups, kernels

_MODEL = flags.DEFINE_enum("model", "sasrec", kernels.TRAINABLE_MODELS, "Model family.")
_OUT = flags.DEFINE_string("out", "", "Folder for profile_<model>.json ('' = print only).")
_TOP = flags.DEFINE_integer("top", 10, "Instructions to list.")


def main(argv: list[str]) -> None:
  del argv
  profile = groups.profile_step(kernels.train_step_kernel(_MODEL.value))
  profile["load_average"] = os.getloadavg()
  print(f"{_MODEL.value}: {profile['busy_s'] * 1e3:.1f} ms busy per step "
        f"(process CPU {profile.get('cpu_s', 0.0) * 1e3:.1f} ms)")
  for row in sorted(profile["components"], key=lambda r: -r["busy_s"]):
    print(f"  {row['component']:<16} {row['pass']:<9} {row['busy_s'] * 1e3:8.1f} ms "
          f"{row['share'] * 100:5.1f}%")
  for op in profile["top_ops"][:_TOP.value]:
    print(f"  {op['busy_s'] * 1e3:7.1f} ms  {op['op'][:32]:<32} {op['op_name'][-90:]}")
  if _OUT.value:
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, f"profile_{_MODEL.value}.json"), "w",
              encoding="utf-8") as f:
      json.dump(profile, f, indent=2, default=str)


if __name__ == "__main__":
  app.run(main)
