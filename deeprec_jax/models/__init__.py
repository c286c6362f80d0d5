"""The model contract: a registry of specs, the call signature, the shared item table.

A model is a flax linen ``Module`` that maps left-padded item sequences
``item_seq: int32[batch, seq_len]`` (0 = padding) to hidden states
``float32[batch, seq_len, dim]`` (``[batch, dim]`` for window models), called
as ``SequenceModel`` states. Its item vectors are the shared table
(``item_embedding.ItemEmbedding`` at ``ITEM_TABLE``), and every score is
``hidden @ item_vectors(model, params, num_items, images).T`` (the table's
rows, or the item pictures' CNN vectors when ``model.item_encoder`` says so);
losses and metrics see nothing else.
``MODELS`` names each model's spec: its module, the training task the
pipeline builds examples for, whether rows may be packed, and how it is fitted
when it has no gradient training. A new model is one file, one entry here and
one config; ``train.py`` names no model.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from deeprec_jax.models import (
  bert4rec,
  caser,
  hstu,
  item_embedding,
  layers,
  popularity,
  rnn,
  sasrec,
)

# What the pipeline builds examples for: 'autoregressive' (targets are the
# next items), 'window' (L previous items -> T next items, Caser) or 'masked'
# (cloze, BERT4Rec).
TASKS = ("autoregressive", "window", "masked")
ITEM_TABLE = item_embedding.ITEM_TABLE


class SequenceModel(Protocol):
  """The call every model accepts (``Module.apply(variables, item_seq, ...)``)."""

  def __call__(self, item_seq: jax.Array, *, deterministic: bool = True,
               user: jax.Array | None = None, last_only: bool = False,
               segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """Encodes item sequences.

    Args:
      item_seq: ``int32[batch, seq_len]`` item ids, 0 = padding, left-padded.
      deterministic: False enables dropout (needs the ``'dropout'`` RNG).
      user: ``int32[batch]`` user ids (required by Caser, ignored elsewhere).
      last_only: return the last position only: ``[batch, 1, dim]``.
      segment_ids: ``int32[batch, seq_len]`` for packed rows (``packs``
        models only; others raise): segments never see each other.
      positions: ``int32[batch, seq_len]`` positional rows of packed rows.

    Models that read timestamps (``uses_timestamps``: HSTU with
    ``time_buckets > 0``) also take ``time_seq`` and ``query_time``,
    ``int32[batch, seq_len]`` (``times.timed_rows``).

    Returns:
      ``float32[batch, seq_len, dim]`` (``[batch, dim]`` for window models),
      zero at padding positions.
    """


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What the trainer needs to know about a model, and nothing model-specific.

  Attributes:
    module: the linen Module class; built as ``module(num_items=, num_users=,
      max_len=, **config.model minus name)``.
    task: one of ``TASKS``.
    packs: rows may hold several users' sequences (``segment_ids``,
      ``positions``) when ``train.pack`` is on.
    fit: for a model without gradient training, ``fit(item_counts) ->
      params`` from the training parts' counts ``int[num_items + 1]``; None
      for gradient-trained models.
  """

  module: type[nn.Module]
  task: str
  packs: bool = False
  fit: Callable[[np.ndarray], Any] | None = None

  @property
  def trainable(self) -> bool:
    return self.fit is None


MODELS: dict[str, ModelSpec] = {
    "popularity": ModelSpec(popularity.Model, "autoregressive", fit=popularity.fit_params),
    "caser": ModelSpec(caser.Model, "window"),
    "rnn": ModelSpec(rnn.Model, "autoregressive"),
    "sasrec": ModelSpec(sasrec.Model, "autoregressive", packs=True),
    "bert4rec": ModelSpec(bert4rec.Model, "masked", packs=True),
    "hstu": ModelSpec(hstu.Model, "autoregressive", packs=True),
}


def spec(name: str) -> ModelSpec:
  """The spec of model ``name`` (``config.model.name``)."""
  if name not in MODELS:
    raise ValueError(f"config key model.name: unknown model {name!r}; expected one of "
                     f"{', '.join(MODELS)}.")
  return MODELS[name]


def create_model(model_config: ml_collections.ConfigDict, *, num_items: int, num_users: int,
                 max_len: int) -> nn.Module:
  """Builds the module of ``config.model`` (every key but ``name`` is a field)."""
  kwargs: dict[str, Any] = dict(model_config)
  model_spec = spec(kwargs.pop("name"))
  return model_spec.module(num_items=num_items, num_users=num_users, max_len=max_len,
                           **kwargs)


def uses_timestamps(model: nn.Module) -> bool:
  """Whether ``model`` reads ``time_seq`` and ``query_time`` (HSTU with a time bias)."""
  return bool(getattr(model, "time_buckets", 0))


def item_table(params: Any, num_items: int) -> jax.Array:
  """The scored rows of the shared item table: ``[num_items + 1, dim]``.

  Row 0 is padding and must be masked out by whoever ranks; the rows after
  ``num_items`` (BERT4Rec's mask token, the padding to ``ROW_MULTIPLE``) are
  dropped.
  """
  return params[ITEM_TABLE[0]][ITEM_TABLE[1]][: num_items + 1]


def item_encoder(model: nn.Module) -> str:
  """``model.item_encoder`` ('id', 'image' or 'id+image'); 'id' for models without one."""
  return getattr(model, "item_encoder", "id")


def item_vectors(model: nn.Module, params: Any, num_items: int, images: Any = None, *,
                 chunk_size: int = 0, rng: jax.Array | None = None,
                 ids: jax.Array | None = None) -> jax.Array:
  """The scored item vectors ``[num_items + 1, dim]``; every score is ``hidden @ this.T``.

  With ``model.output_table`` (SASRec, BERT4Rec) the rows are those of a
  separate output table (``item_embedding.OUTPUT_TABLE``) instead of the input
  one. With ``model.l2_norm`` (SASRec, BERT4Rec, HSTU) every row is
  L2-normalized, so that scores are cosine similarities.
  'id': exactly ``item_table(params, num_items)``. 'image': the model's image
  tower (``encode_images``) over ``images``, row 0 (padding) zeroed. 'id+image':
  their sum (with ``rng``, training only, each id row dropped with probability
  ``model.id_dropout``). Models with an image encoder take these vectors as
  their input embedding too (``item_vectors=`` in their call).

  Args:
    model: a module following the model contract.
    params: its parameters.
    num_items: N.
    images: ``uint8[N + 1, H, W, 3]`` item pictures (``data.images``); only
      read by the image encoders.
    chunk_size: if > 0, the tower runs over this many pictures at a time
      (``lax.map``), bounding its activations (evaluation's catalogue pass).
    rng: the key of ``id_dropout`` ('id+image' training); None = no dropout.
    ids: ``int32[U]`` (image encoders only): the vectors of these items alone,
      ``[U, dim]``, so that the tower runs on the pictures a batch needs
      (``row_sparse.localize``); ids past ``N`` get zero pictures.

  Returns:
    ``float32[N + 1, dim]``, or ``[U, dim]`` with ``ids``.
  """
  vectors = _item_vectors(model, params, num_items, images, chunk_size=chunk_size, rng=rng,
                          ids=ids)
  return layers.l2_normalize(vectors) if getattr(model, "l2_norm", False) else vectors


def _item_vectors(model: nn.Module, params: Any, num_items: int, images: Any, *,
                  chunk_size: int, rng: jax.Array | None, ids: jax.Array | None) -> jax.Array:
  """``item_vectors`` before the optional L2 normalization."""
  if getattr(model, "output_table", False):  # gSASRec's own output rows (id encoder only)
    outer, inner = item_embedding.OUTPUT_TABLE
    return params[outer][inner][: num_items + 1]
  table = item_table(params, num_items)
  encoder = item_encoder(model)
  if encoder == "id":
    return table
  if images is None or images.shape[0] != num_items + 1:
    raise ValueError(f"model.item_encoder={encoder!r} needs the pictures of items 0..{num_items} "
                     f"(data.images), got {None if images is None else images.shape}.")
  if ids is not None:
    table = jnp.take(table, ids, axis=0, mode="fill", fill_value=0)
    images = jnp.take(images, ids, axis=0, mode="fill", fill_value=0)
  encode = lambda x: model.apply({"params": params}, x, method="encode_images")
  if chunk_size and images.shape[0] > chunk_size:
    rows = images.shape[0]
    padded = jnp.pad(images, ((0, -rows % chunk_size),) + ((0, 0),) * (images.ndim - 1))
    chunks = padded.reshape((-1, chunk_size) + images.shape[1:])
    pictures = jax.lax.map(encode, chunks).reshape(-1, table.shape[-1])[:rows]
  else:
    pictures = encode(images)
  pictures = pictures.astype(jnp.float32).at[0].set(0.0)
  if encoder == "image":
    return pictures
  table = table.astype(jnp.float32)
  rate = getattr(model, "id_dropout", 0.0)
  if rng is not None and rate > 0:
    table = table * jax.random.bernoulli(rng, 1.0 - rate, (table.shape[0], 1))
  return table + pictures


def init_params(model: nn.Module, rng: jax.Array, item_seq: jax.Array, *,
                user: jax.Array | None = None, images: Any = None) -> Any:
  """``model.init(rng, item_seq, user=user)['params']``, plus the image tower's if it has one.

  Compiled as one program at XLA's lowest optimization level: it runs once,
  and that compiles in 0.7 s instead of 2.3 s for SASRec at L = 200 on 2 CPU
  cores (eagerly, every op of the init's forward pass compiles on its own:
  ~4 s). Values can differ from an eager init by float32 rounding (the
  initializers' float ops are fused differently).
  """
  # Timestamps only shape the attention, not the parameters: zeros will do.
  times = ({key: jnp.zeros(item_seq.shape, jnp.int32) for key in ("time_seq", "query_time")}
           if uses_timestamps(model) else {})
  if item_encoder(model) == "id":
    return _jit_once(lambda rng, item_seq, user: model.init(rng, item_seq, user=user,
                                                            **times)["params"])(
        rng, item_seq, user)
  if images is None:
    raise ValueError(f"model.item_encoder={item_encoder(model)!r} needs the item pictures "
                     "(data.images).")

  def both(module, item_seq, user, images):
    module.encode_images(images)
    return module(item_seq, user=user)

  return _jit_once(lambda *args: model.init(*args, method=both)["params"])(
      rng, item_seq, user, jnp.asarray(images[:1]))


def _jit_once(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``jax.jit(fn)`` compiled for speed of compilation: for programs that run once."""
  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})
