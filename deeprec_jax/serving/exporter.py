"""Writes a trained model's scoring function as a portable artifact (``jax.export``).

The exported function is ``evaluate.top_k`` (the model's last hidden state
against the item table, padding and excluded items masked to ``-inf``, then
``jax.lax.top_k``), with the parameters as an argument, not constants: they
are stored beside it in ``params.npz``. The batch and the exclusion width are
symbolic, so one artifact serves any batch size. Image item encoders
(``model.item_encoder`` 'image' or 'id+image') score against the catalogue's
item vectors: ``export_trained`` computes them once (``Trainer.item_vectors``,
the path evaluation and ``recommend`` take) and stores them in
``item_vectors.npy``, and the function takes them as one more argument
(artifact format 2), so no request runs the image tower. ``artifact.py``
describes the files and loads them with ``jax`` and numpy alone.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import linen as nn

from deeprec_jax import evaluate, models, run_config, train
from deeprec_jax.serving import artifact

# Where the export asks to be runnable; cuda lowers on a CPU-only jaxlib too.
DEFAULT_PLATFORMS = ("cpu", "cuda")
DEFAULT_TOP_K = 100
_SEPARATOR = "/"


def flatten_params(params: Any) -> dict[str, np.ndarray]:
  """``{'a/b/c': numpy array}`` of a nested params dict (host copies)."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
    names = [str(getattr(key, "key", key)) for key in path]
    if any(_SEPARATOR in name for name in names):
      raise ValueError(f"parameter path {names} holds {_SEPARATOR!r}: cannot flatten it.")
    array = np.asarray(leaf)
    if array.dtype.kind not in "biuf":
      raise ValueError(f"parameter {'/'.join(names)} has dtype {array.dtype}, which .npz "
                       "cannot store; export float32 params.")
    flat[_SEPARATOR.join(names)] = array
  return flat


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
  """The nested dict of ``flatten_params``' output."""
  nested: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split(_SEPARATOR)
    node = nested
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = value
  return nested


def config_hash(config: ml_collections.ConfigDict | Mapping[str, Any]) -> str:
  """16 hex digits of the SHA-256 of the config as sorted JSON."""
  as_dict = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  blob = json.dumps(as_dict, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _specs(flat: Mapping[str, np.ndarray]) -> dict[str, jax.ShapeDtypeStruct]:
  return {name: jax.ShapeDtypeStruct(value.shape, value.dtype) for name, value in flat.items()}


def _vector_inputs(item_vectors: Any) -> dict[str, Any]:
  return {} if item_vectors is None else {"item_vectors": item_vectors}


def uses_user(model: nn.Module, flat: Mapping[str, np.ndarray], max_len: int,
              item_vectors: jax.ShapeDtypeStruct | None = None) -> bool:
  """Whether the model's output reads ``user`` (Caser), from its traced program.

  ``item_vectors`` is the shape of the precomputed vectors (image encoders).
  """
  def hidden(user, params, item_seq, vectors):
    return model.apply({"params": unflatten_params(params)}, item_seq, user=user,
                       last_only=True, **_vector_inputs(vectors))

  closed = jax.make_jaxpr(hidden)(jax.ShapeDtypeStruct((1,), jnp.int32), _specs(flat),
                                  jax.ShapeDtypeStruct((1, max_len), jnp.int32), item_vectors)
  user_var = closed.jaxpr.invars[0]
  return (any(v is user_var for eqn in closed.jaxpr.eqns for v in eqn.invars)
          or any(v is user_var for v in closed.jaxpr.outvars))


def export_function(model: nn.Module, flat: Mapping[str, np.ndarray], *, num_items: int,
                    max_len: int, top_k: int, platforms: Sequence[str] = DEFAULT_PLATFORMS,
                    item_vectors: jax.ShapeDtypeStruct | None = None
                    ) -> tuple[jax.export.Exported, str]:
  """``jax.export`` of ``f(params, item_seq, exclude, user[, item_vectors]) -> (items, scores)``.

  Args:
    model: a module following the model contract.
    flat: its parameters, ``flatten_params``.
    num_items: ``N``.
    max_len: the input length ``L`` of ``item_seq: int32[b, L]``.
    top_k: ``K`` of the outputs ``int32[b, K]``, ``float32[b, K]``.
    platforms: what to lower for. If lowering for them fails, the export
      falls back to ``('cpu',)``.
    item_vectors: the shape and dtype of the catalogue's precomputed vectors
      ``[N + 1, dim]`` (image encoders): the function then takes them as a
      fifth argument, embeds and scores with them (``evaluate.top_k``'s
      ``item_vectors``). None: four arguments, the id table.

  Returns:
    ``(exported, note)``: the note says why the platforms fell back ('' if
    they did not).

  Raises:
    ValueError: the model reads timestamps (the signature has none).
  """
  if models.uses_timestamps(model):
    raise ValueError("config key model.time_buckets: the serving signature takes item ids "
                     "only, so a model with a time bias (time_buckets > 0) cannot be "
                     "exported; train with model.time_buckets=0 to serve it.")

  def recommend(params, item_seq, exclude, user, *vectors):
    return evaluate.top_k(model, unflatten_params(params), num_items, item_seq, exclude, top_k,
                          user=user, item_vectors=vectors[0] if vectors else None)

  batch, width = jax.export.symbolic_shape("b, h")
  args = (_specs(flat), jax.ShapeDtypeStruct((batch, max_len), jnp.int32),
          jax.ShapeDtypeStruct((batch, width), jnp.int32),
          jax.ShapeDtypeStruct((batch,), jnp.int32))
  args += () if item_vectors is None else (item_vectors,)
  try:
    return jax.export.export(jax.jit(recommend), platforms=tuple(platforms))(*args), ""
  except Exception as e:  # Any lowering failure: fall back, and say why.
    if tuple(platforms) == ("cpu",):
      raise
    note = f"lowering for {', '.join(platforms)} failed ({type(e).__name__}: {e}"[:500] + ")"
    logging.warning("%s; exporting for cpu only.", note)
    return jax.export.export(jax.jit(recommend), platforms=("cpu",))(*args), note


def write_artifact(out_dir: str, *, model: nn.Module, params: Any, model_name: str, task: str,
                   num_items: int, item_ids: np.ndarray, user_ids: np.ndarray, max_len: int,
                   top_k: int = DEFAULT_TOP_K, config: Any = None, step: int | None = None,
                   platforms: Sequence[str] = DEFAULT_PLATFORMS, source: str = "",
                   longest_history: int | None = None,
                   item_vectors: Any = None) -> dict[str, Any]:
  """Exports ``model`` with ``params`` into ``out_dir``; returns the manifest.

  Args:
    out_dir: the artifact directory (created; its files are replaced).
    model: a module following the model contract.
    params: its parameters (any placement; copied to the host).
    model_name: ``config.model.name``.
    task: the model's task (``models.TASKS``): how the loader builds inputs.
    num_items: ``N``.
    item_ids: ``int[N + 1]``, the original id of each model id.
    user_ids: ``int[num_users]``, the original id of each user index.
    max_len: the input length.
    top_k: the largest ``k`` served; capped at ``N``.
    config: the run's config (ConfigDict or dict), stored and hashed.
    step: the checkpoint's step, for the record.
    platforms: what to lower for (``export_function``).
    source: where the params come from (a workdir), for the record.
    longest_history: the dataset's longest user history, so that
      ``Artifact.warm_up`` compiles every exclusion width it will meet.
    item_vectors: ``float[N + 1, dim]``, the catalogue's
      ``models.item_vectors`` over the run's pictures; required by image item
      encoders (``model.item_encoder != 'id'``) and refused otherwise. Stored
      as ``item_vectors.npy`` (float32; artifact format 2).

  Returns:
    The manifest written to ``out_dir/manifest.json``.
  """
  item_ids = np.asarray(item_ids, np.int64)
  if len(item_ids) != num_items + 1:
    raise ValueError(f"item_ids has {len(item_ids)} entries; expected num_items + 1 = "
                     f"{num_items + 1}.")
  if top_k < 1:
    raise ValueError(f"top_k={top_k}: expected a positive integer.")
  top_k = min(int(top_k), num_items)
  encoder = models.item_encoder(model)
  if (item_vectors is None) != (encoder == "id"):
    raise ValueError(
        f"model.item_encoder={encoder!r}: " + (
            "give item_vectors, the catalogue's models.item_vectors over the run's pictures "
            "(export_trained computes them)." if item_vectors is None else
            "the model scores against its id table; item_vectors are only for image item "
            "encoders."))
  vectors_spec = None
  if item_vectors is not None:
    item_vectors = np.asarray(jax.device_get(item_vectors), np.float32)
    if item_vectors.ndim != 2 or len(item_vectors) != num_items + 1:
      raise ValueError(f"item_vectors has shape {item_vectors.shape}; expected "
                       f"[num_items + 1 = {num_items + 1}, dim].")
    vectors_spec = jax.ShapeDtypeStruct(item_vectors.shape, item_vectors.dtype)
  flat = flatten_params(params)
  exported, note = export_function(model, flat, num_items=num_items, max_len=max_len,
                                   top_k=top_k, platforms=platforms, item_vectors=vectors_spec)
  config_dict = (config.to_dict() if isinstance(config, ml_collections.ConfigDict)
                 else dict(config or {}))
  manifest = {
      # Format 1 unless the function takes precomputed vectors (artifact.py).
      "format_version": 1 if item_vectors is None else artifact.FORMAT_VERSION,
      "model": model_name,
      "task": task,
      "config_hash": config_hash(config_dict),
      "jax_version": jax.__version__,
      "calling_convention_version": exported.calling_convention_version,
      "platforms": list(exported.platforms),
      "platforms_requested": list(platforms),
      "platform_note": note,
      "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "top_k": top_k,
      "needs_user": uses_user(model, flat, max_len, vectors_spec),
      "max_len": int(max_len),
      "num_items": int(num_items),
      "num_users": int(len(user_ids)),
      "mask_token": int(num_items + 1) if task == "masked" else None,
      "longest_history": None if longest_history is None else int(longest_history),
      "step": None if step is None else int(step),
      "source": source,
      "num_params": int(sum(v.size for v in flat.values())),
      "signature": "f(params, item_seq int32[b, max_len], exclude int32[b, h], user int32[b])"
                   " -> (items int32[b, top_k], scores float32[b, top_k])",
      "files": {"function": artifact.FUNCTION, "params": artifact.PARAMS,
                "item_ids": artifact.ITEM_IDS, "user_ids": artifact.USER_IDS,
                "config": artifact.CONFIG},
  }
  if item_vectors is not None:  # Format 2; format-1 manifests stay as they were.
    manifest.update(
        item_encoder=encoder, item_vectors_shape=list(item_vectors.shape),
        signature=manifest["signature"].replace(
            "user int32[b])", "user int32[b], item_vectors float32[num_items + 1, dim])"))
    manifest["files"]["item_vectors"] = artifact.ITEM_VECTORS
  os.makedirs(out_dir, exist_ok=True)
  _write(out_dir, artifact.FUNCTION, lambda f: f.write(exported.serialize()))
  _write(out_dir, artifact.PARAMS, lambda f: np.savez(f, **flat))
  if item_vectors is not None:
    _write(out_dir, artifact.ITEM_VECTORS, lambda f: np.save(f, item_vectors))
  elif os.path.exists(os.path.join(out_dir, artifact.ITEM_VECTORS)):
    os.unlink(os.path.join(out_dir, artifact.ITEM_VECTORS))  # Left by an earlier export.
  _write(out_dir, artifact.ITEM_IDS, lambda f: np.save(f, item_ids))
  _write(out_dir, artifact.USER_IDS, lambda f: np.save(f, np.asarray(user_ids, np.int64)))
  _write(out_dir, artifact.CONFIG, lambda f: f.write(
      json.dumps(config_dict, indent=2, sort_keys=True, default=str).encode()))
  # The manifest last: a directory with a manifest is a complete artifact.
  _write(out_dir, artifact.MANIFEST, lambda f: f.write(
      json.dumps(manifest, indent=2).encode()))
  return manifest


def _write(out_dir: str, name: str, write) -> None:
  """Writes ``out_dir/name`` atomically (a temporary file, then a rename)."""
  fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep a serving account out.
    os.replace(tmp, os.path.join(out_dir, name))
  except BaseException:
    os.unlink(tmp)
    raise


def export_trained(trainer: train.Trainer, params: Any, out_dir: str, *,
                   top_k: int = DEFAULT_TOP_K, max_len: int | None = None,
                   step: int | None = None, source: str = "", config: Any = None,
                   platforms: Sequence[str] = DEFAULT_PLATFORMS) -> dict[str, Any]:
  """Exports a ``train.Trainer``'s model with ``params``; returns the manifest.

  Args:
    trainer: the run (model, dataset, config).
    params: its parameters.
    out_dir: the artifact directory.
    top_k: the largest ``k`` served (capped at the catalogue size).
    max_len: a shorter input than the run's ``data.max_len`` (less compute;
      histories are cut to their most recent items); None: the run's. Window
      models (Caser) take only their own window.
    step: the checkpoint's step, for the record.
    source: where the params come from, for the record.
    config: the config to store and hash; default ``trainer.config``.
    platforms: what to lower for.

  Image item encoders: the catalogue's vectors are computed here, once,
  with ``trainer.item_vectors(params)`` (the run's pictures through the image
  tower, as evaluation and ``recommend`` compute them) and stored with the
  parameters.
  """
  run_len = int(trainer.config.data.max_len)
  max_len = run_len if max_len is None else int(max_len)
  if trainer.task == "window" and max_len != run_len:
    raise ValueError(f"max_len={max_len}: a window model takes its whole window, "
                     f"data.max_len={run_len}.")
  shortest = 2 if trainer.task == "masked" else 1
  if not shortest <= max_len <= run_len:
    raise ValueError(f"max_len={max_len}: expected an integer in [{shortest}, {run_len}] "
                     "(the run's data.max_len).")
  dataset = trainer.dataset
  lengths = (dataset.lengths if dataset.lengths is not None
             else [len(record["item_seq"]) for record in dataset.source])
  return write_artifact(out_dir, model=trainer.model, params=params,
                        model_name=trainer.config.model.name, task=trainer.task,
                        num_items=dataset.num_items, item_ids=dataset.item_ids,
                        user_ids=dataset.user_ids, max_len=max_len, top_k=top_k,
                        config=trainer.config if config is None else config, step=step,
                        platforms=platforms, source=source,
                        longest_history=int(np.max(lengths)) if len(lengths) else None,
                        item_vectors=trainer.item_vectors(params))


def export_workdir(workdir: str, out_dir: str, **kwargs: Any) -> dict[str, Any]:
  """Exports the best checkpoint of the run in ``workdir`` (``train.load_trained``).

  ``kwargs`` go to ``export_trained`` (``top_k``, ``max_len``, ``platforms``).
  The config stored and hashed is the run's saved ``config.json``.
  """
  trainer, params, step = train.load_trained(workdir)
  return export_trained(trainer, params, out_dir, step=step, source=os.path.abspath(workdir),
                        config=run_config.load(workdir), **kwargs)
