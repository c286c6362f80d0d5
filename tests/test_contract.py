"""The model contract (models/__init__.py), the package's import graph, saved-run upgrades."""

import ast
import inspect
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import deeprec_jax
from deeprec_jax import models, run_config, train
from deeprec_jax.models import item_embedding
from experiments.configs import tiny

PACKAGE_DIR = pathlib.Path(deeprec_jax.__file__).parent
LEGACY_RUN = pathlib.Path(__file__).parent / "fixtures" / "legacy_sasrec_mp2"


def _module_names() -> list[str]:
  names = []
  for path in sorted(PACKAGE_DIR.rglob("*.py")):
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
  return names


def _imports(name: str, modules: set[str]) -> set[str]:
  """Package modules that ``name`` imports at module level (a submodule, not its package)."""
  path = PACKAGE_DIR.parent / (name.replace(".", "/") + ".py")
  if not path.exists():
    path = PACKAGE_DIR.parent / name.replace(".", "/") / "__init__.py"
  edges = set()
  for node in ast.parse(path.read_text(encoding="utf-8")).body:
    if isinstance(node, ast.Import):
      edges |= {alias.name for alias in node.names if alias.name in modules}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        submodule = f"{node.module}.{alias.name}"
        if submodule in modules:
          edges.add(submodule)
        elif node.module in modules:
          edges.add(node.module)  # A name defined in the package's __init__.
  return edges - {name}


def test_no_import_cycle_inside_the_package():
  modules = set(_module_names())
  graph = {name: _imports(name, modules) for name in modules}
  assert graph["deeprec_jax.train"] >= {"deeprec_jax.models", "deeprec_jax.sharding"}
  done, stack = set(), []

  def visit(name):
    if name in stack:
      cycle = stack[stack.index(name):] + [name]
      pytest.fail(f"import cycle: {' -> '.join(cycle)}")
    if name in done:
      return
    stack.append(name)
    for dependency in sorted(graph[name]):
      visit(dependency)
    stack.pop()
    done.add(name)

  for name in sorted(graph):
    visit(name)


def test_every_module_imports_first():
  """Each module imports on its own, first (a cycle would fail for some order)."""
  names = _module_names()
  assert len(names) > 25 and "deeprec_jax.ablation.plan" in names
  script = (
      "import importlib, sys\n"
      f"for name in {names!r}:\n"
      "  for loaded in [m for m in sys.modules if m.startswith('deeprec_jax')]:\n"
      "    del sys.modules[loaded]\n"
      "  importlib.import_module(name)\n"
      "print('ok')\n")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          timeout=300)
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


_CALL_KEYWORDS = ("deterministic", "user", "last_only", "segment_ids", "positions")


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_model_accepts_the_protocol_call(name):
  model_spec = models.spec(name)
  assert model_spec.task in models.TASKS
  parameters = inspect.signature(model_spec.module.__call__).parameters
  protocol = inspect.signature(models.SequenceModel.__call__).parameters
  for keyword in _CALL_KEYWORDS:
    assert parameters[keyword].kind is inspect.Parameter.KEYWORD_ONLY, keyword
    assert parameters[keyword].default == protocol[keyword].default, keyword

  config = tiny.get_config(name)
  max_len = config.data.max_len
  model = models.create_model(config.model, num_items=40, num_users=64, max_len=max_len)
  item_seq = jnp.asarray(np.tile(np.arange(1, max_len + 1, dtype=np.int32), (2, 1)))
  user = jnp.zeros((2,), jnp.int32)
  params = model.init(jax.random.key(0), item_seq, user=user)["params"]
  table = params[models.ITEM_TABLE[0]][models.ITEM_TABLE[1]]
  real_rows = 42 if name == "bert4rec" else 41  # + the mask token
  assert table.shape[0] == item_embedding.table_rows(real_rows) == 128
  np.testing.assert_array_equal(table[real_rows:], 0.0)
  assert models.item_table(params, 40).shape[0] == 41
  hidden = model.apply({"params": params}, item_seq, user=user, deterministic=True)
  assert hidden.shape[0] == 2 and hidden.dtype == jnp.float32
  if not model_spec.packs:
    with pytest.raises(ValueError, match="packed rows"):
      model.apply({"params": params}, item_seq, user=user, segment_ids=item_seq)


def test_only_a_fitted_model_skips_gradient_training():
  fitted = [name for name, model_spec in models.MODELS.items() if not model_spec.trainable]
  assert fitted == ["popularity"]
  params = models.spec("popularity").fit(np.array([0, 3, 1, 2]))
  assert params[models.ITEM_TABLE[0]][models.ITEM_TABLE[1]].shape == (128, 1)


def test_unknown_model_names_the_config_key():
  with pytest.raises(ValueError, match="model.name.*sasrec"):
    models.spec("transformer")


def test_a_model_axis_that_does_not_divide_the_row_multiple_is_refused():
  config = tiny.get_config("sasrec")
  config.train.num_devices, config.train.model_parallel = 3, 3
  with pytest.raises(ValueError, match="train.model_parallel=3 must divide 128"):
    train.Trainer(config, train.builders.load(config.data))


def test_old_configs_are_upgraded_in_one_place():
  with open(LEGACY_RUN / "config.json", encoding="utf-8") as f:
    saved = json.load(f)
  saved["model"]["name"] = "caser"
  saved["model"]["num_targets"] = 3  # Where Caser's T lived before config.task.
  for key in ("pack", "model_parallel"):
    del saved["train"][key]
  del saved["eval"]["length_buckets"]
  config = run_config.upgrade_config(ml_collections.ConfigDict(saved))
  assert "num_targets" not in config.model and config.task.num_targets == 3
  assert config.task.mask_prob == 0.2
  assert (config.train.pack, config.train.model_parallel, config.eval.length_buckets) == (
      False, 1, 4)
  assert run_config.upgrade_config(config).to_dict() == config.to_dict()  # Idempotent.


def test_checkpoint_written_before_the_fixed_table_layout_restores(tmp_path):
  """A run saved by the code that padded the table per mesh (42 rows, 2-way split)."""
  workdir = tmp_path / "run"
  shutil.copytree(LEGACY_RUN, workdir)
  with open(LEGACY_RUN / "final_metrics.json", encoding="utf-8") as f:
    saved_metrics = json.load(f)
  trainer, params, step = train.load_trained(str(workdir))
  assert step == saved_metrics["best_step"]
  assert "num_targets" not in trainer.config.model and "task" in trainer.config
  table = jax.device_get(params[models.ITEM_TABLE[0]][models.ITEM_TABLE[1]])
  real_rows = trainer.dataset.num_items + 1
  assert table.shape[0] == item_embedding.table_rows(real_rows) and real_rows < 42
  np.testing.assert_array_equal(table[real_rows:], 0.0)
  test = trainer.evaluate(params, "test")
  for key in ("ndcg@10", "hr@10", "mrr@10", "sampled_ndcg@10"):
    np.testing.assert_allclose(test[key], saved_metrics[f"test/{key}"], rtol=1e-5, err_msg=key)
