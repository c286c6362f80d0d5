"""Image-aware item vectors (model.item_encoder) and the item_vectors contract."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deeprec_jax import evaluate, losses, models, optimizers, recommend, train
from deeprec_jax.data import builders
from deeprec_jax.models import image_cnn
from experiments.configs import tiny

NUM_ITEMS, SIZE = 12, 12
TOWER = dict(image_channels=(3, 5), image_dense=8)


def _model(name, encoder, **fields):
  config = tiny.get_config(name).model
  config.item_encoder = encoder
  config.update(TOWER)
  config.update(fields)
  return models.create_model(config, num_items=NUM_ITEMS, num_users=5, max_len=6)


def _images(rows=NUM_ITEMS + 1):
  images = np.random.default_rng(0).integers(0, 256, (rows, SIZE, SIZE, 3), dtype=np.uint8)
  images[0] = 0
  return images


USER = jnp.array([1, 2], jnp.int32)  # Caser reads user ids; the others ignore them


def _item_seq():
  return jnp.array([[0, 0, 3, 1, 7, 2], [0, 0, 0, 0, 5, 12]], jnp.int32)


@pytest.mark.parametrize("name", ["sasrec", "rnn"])
def test_id_encoder_is_the_table(name):
  config = tiny.get_config(name).model
  model = models.create_model(config, num_items=NUM_ITEMS, num_users=5, max_len=6)
  seq = _item_seq()
  params = models.init_params(model, jax.random.key(0), seq, user=jnp.array([1, 2]))
  np.testing.assert_array_equal(models.item_vectors(model, params, NUM_ITEMS),
                                models.item_table(params, NUM_ITEMS))
  assert models.item_encoder(model) == "id"


@pytest.mark.parametrize("name", ["sasrec", "rnn", "bert4rec", "caser"])
def test_image_vectors_are_the_tower(name):
  images = _images()
  model = _model(name, "image")
  params = models.init_params(model, jax.random.key(0), _item_seq(), user=USER, images=images)
  assert image_cnn.IMAGE_TOWER in params
  tower = image_cnn.ItemImageCNN(out_dim=model.dim, channels=(3, 5), dense_dim=8)
  direct = np.asarray(tower.apply({"params": params[image_cnn.IMAGE_TOWER]}, images))
  vectors = np.asarray(models.item_vectors(model, params, NUM_ITEMS, images))
  assert vectors.shape == (NUM_ITEMS + 1, model.dim)
  np.testing.assert_array_equal(vectors[0], 0.0)
  np.testing.assert_allclose(vectors[1:], direct[1:], rtol=1e-6, atol=1e-6)
  chunked = models.item_vectors(model, params, NUM_ITEMS, images, chunk_size=5)
  np.testing.assert_allclose(chunked, vectors, rtol=1e-6, atol=1e-6)

  both = _model(name, "id+image", id_dropout=0.5)
  table = np.asarray(models.item_table(params, NUM_ITEMS))
  np.testing.assert_allclose(models.item_vectors(both, params, NUM_ITEMS, images),
                             vectors + table, rtol=1e-6, atol=1e-6)
  # id_dropout (training, with a key): each row keeps its id part or drops all of it.
  dropped = np.asarray(models.item_vectors(both, params, NUM_ITEMS, images,
                                           rng=jax.random.key(3))) - vectors
  kept = np.isclose(dropped, table, atol=1e-6).all(1)
  assert (kept | np.isclose(dropped, 0.0, atol=1e-6).all(1)).all()
  assert 0 < kept[1:].sum() < NUM_ITEMS


@pytest.mark.parametrize("name", ["sasrec", "rnn", "bert4rec", "caser"])
def test_inputs_use_the_given_vectors(name):
  model = _model(name, "id")
  seq = _item_seq()
  params = models.init_params(model, jax.random.key(0), seq, user=USER)
  table = models.item_table(params, NUM_ITEMS)
  plain = model.apply({"params": params}, seq, user=USER)
  np.testing.assert_array_equal(
      model.apply({"params": params}, seq, user=USER, item_vectors=table), plain)
  # Other vectors change the inputs, hence the outputs at real positions (random: BERT4Rec
  # layer-norms its embeddings, which would cancel a constant shift).
  shift = jax.random.normal(jax.random.key(5), table.shape)
  moved = model.apply({"params": params}, seq, user=USER, item_vectors=table + shift)
  assert not np.allclose(moved[:, -1], plain[:, -1])
  # Scoring with the vectors given equals scoring through the table.
  scores = evaluate.score_items(model, params, NUM_ITEMS, seq, user=USER)
  np.testing.assert_array_equal(
      evaluate.score_items(model, params, NUM_ITEMS, seq, user=USER, item_vectors=table), scores)


def test_image_encoder_train_step_and_eval():
  images = _images()
  model = _model("sasrec", "image")
  seq = _item_seq()
  params = models.init_params(model, jax.random.key(0), seq, images=images)
  tx = optimizers.create_optimizer(tiny.get_config("sasrec").train, 10)
  state = dict(params=params, opt_state=tx.init(params), step=jnp.int32(0),
               rng=jax.random.key_data(jax.random.key(0, impl=train.DROPOUT_RNG_IMPL)))
  batch = {"item_seq": seq, "targets": jnp.roll(seq, -1, axis=1) * (seq > 0),
           "negatives": jnp.full(seq.shape + (1,), 4, jnp.int32) * (seq[..., None] > 0),
           "user": jnp.array([1, 2], jnp.int32)}
  step = jax.jit(train.make_train_step(model, tx, loss="bce", num_items=NUM_ITEMS,
                                       images=images))
  new_state, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  tower_grad_moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                                  params[image_cnn.IMAGE_TOWER],
                                  new_state["params"][image_cnn.IMAGE_TOWER])
  assert all(jax.tree.leaves(tower_grad_moved))
  # The pictures as the step's argument: the same step, and no constant of the
  # program (the trainer passes them so; the closure's copy is baked into the HLO).
  as_argument = jax.jit(train.make_train_step(model, tx, loss="bce", num_items=NUM_ITEMS))
  argument_state, argument_metrics = as_argument(state, batch, images)
  np.testing.assert_allclose(argument_metrics["loss"], metrics["loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               argument_state["params"], new_state["params"])
  constants = lambda jitted, *args: sum(np.size(c) for c in jitted.trace(*args).jaxpr.consts)
  assert constants(step, state, batch) >= images.size
  assert constants(as_argument, state, batch, images) < images.size
  with pytest.raises(ValueError, match="needs the pictures"):
    models.item_vectors(model, params, NUM_ITEMS)
  with pytest.raises(ValueError, match="needs the item pictures"):
    models.init_params(model, jax.random.key(0), seq)


def _conv_batch_sizes(jaxpr) -> list[int]:
  """The batch size of every convolution in a jaxpr, nested calls included."""
  sizes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      sizes.append(eqn.invars[0].aval.shape[0])
    for sub in jax.core.jaxprs_in_params(eqn.params):
      sizes += _conv_batch_sizes(sub)
  return sizes


@pytest.mark.slow  # 21 s; the image encoder's train step and evaluation are tested by default
def test_a_train_step_encodes_only_the_pictures_its_batch_needs():
  num_items = 80  # more pictures than the batch names (at most 37 ids)
  config = tiny.get_config("sasrec").model
  config.update(TOWER, item_encoder="image", dropout_rate=0.0)
  model = models.create_model(config, num_items=num_items, num_users=5, max_len=6)
  images = _images(num_items + 1)
  seq = _item_seq()
  params = models.init_params(model, jax.random.key(0), seq, images=images)
  tx = optax.sgd(0.5)  # new params = params - 0.5 * gradient: compares the gradients
  state = dict(params=params, opt_state=tx.init(params), step=jnp.int32(0),
               rng=jax.random.key_data(jax.random.key(0, impl=train.DROPOUT_RNG_IMPL)))
  batch = {"item_seq": seq, "targets": jnp.roll(seq, -1, axis=1) * (seq > 0),
           "negatives": jnp.array([[[50], [4], [79], [9], [4], [1]]] * 2) * (seq[..., None] > 0),
           "user": jnp.array([1, 2], jnp.int32)}
  step = train.make_train_step(model, tx, loss="bce", num_items=num_items, images=images)
  new_state, metrics = jax.jit(step)(state, batch)

  def objective(params):  # the whole catalogue through the tower
    vectors = models.item_vectors(model, params, num_items, images)
    hidden = model.apply({"params": params}, seq, item_vectors=vectors)
    return losses.compute("bce", hidden, vectors, batch["targets"], batch["negatives"])

  loss, grads = jax.value_and_grad(objective)(params)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  expected = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new_state["params"], expected)
  sizes = _conv_batch_sizes(jax.make_jaxpr(step)(state, batch).jaxpr)
  assert sizes and max(sizes) <= 1 + 3 * seq.size < num_items + 1, sizes


def test_bad_encoder_field():
  with pytest.raises(ValueError, match="model.item_encoder"):
    _model("sasrec", "pixels")
  with pytest.raises(ValueError, match="model.image_channels"):
    _model("rnn", "image", image_channels=())


def test_configs_carry_the_encoder_keys():
  for name in ("sasrec", "rnn", "bert4rec", "caser"):
    assert tiny.get_config(name).model.item_encoder == "id"


def test_bert4rec_mask_token_keeps_its_id_row():
  """Given item vectors embed items 0..N; the [mask] slot (N + 1) reads the id table."""
  model = _model("bert4rec", "id")
  seq = _item_seq().at[:, -1].set(NUM_ITEMS + 1)  # the mask slot, as at evaluation
  params = models.init_params(model, jax.random.key(0), seq)
  table = models.item_table(params, NUM_ITEMS)  # rows 0..N: no mask row
  plain = model.apply({"params": params}, seq)
  np.testing.assert_array_equal(model.apply({"params": params}, seq, item_vectors=table), plain)
  # Moving the item vectors moves the outputs; the mask row is not among them.
  shift = jax.random.normal(jax.random.key(5), table.shape)
  moved = model.apply({"params": params}, seq, item_vectors=table + shift)
  assert not np.allclose(moved[:, -1], plain[:, -1])


@pytest.mark.parametrize("loss", ["softmax", "bce"])
def test_bert4rec_image_encoder_train_step(loss):
  """A masked-task step with pictures trains the tower; it encodes the whole catalogue
  (renumbering the batch's ids would hide the [mask] token), whatever the loss."""
  images = _images()
  model = _model("bert4rec", "image", dropout_rate=0.0)
  mask = NUM_ITEMS + 1
  seq = jnp.array([[0, 0, 3, mask, 7, 2], [0, 0, 0, 0, mask, 12]], jnp.int32)
  targets = jnp.array([[0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 5, 0]], jnp.int32)
  params = models.init_params(model, jax.random.key(0), seq, images=images)
  tx = optimizers.create_optimizer(tiny.get_config("bert4rec").train, 10)
  state = dict(params=params, opt_state=tx.init(params), step=jnp.int32(0),
               rng=jax.random.key_data(jax.random.key(0, impl=train.DROPOUT_RNG_IMPL)))
  batch = {"item_seq": seq, "targets": targets, "user": jnp.array([1, 2], jnp.int32),
           "negatives": jnp.full(seq.shape + (1,), 4, jnp.int32) * (targets[..., None] > 0)}
  step = train.make_train_step(model, tx, loss=loss, num_items=NUM_ITEMS, images=images)
  sizes = _conv_batch_sizes(jax.make_jaxpr(step)(state, batch).jaxpr)
  assert sizes and set(sizes) == {NUM_ITEMS + 1}, sizes
  new_state, metrics = jax.jit(step)(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params[image_cnn.IMAGE_TOWER],
                       new_state["params"][image_cnn.IMAGE_TOWER])
  assert all(jax.tree.leaves(moved))


@pytest.mark.slow  # ~35 s of CPU: a whole run, then load_trained.
def test_train_and_evaluate_with_pictures_on_four_devices(tmp_path):
  config = tiny.get_config("sasrec")
  config.model.item_encoder = "id+image"
  config.model.update(TOWER)
  config.data.images.size = SIZE
  config.data.cold_start_fraction = 0.2
  config.train.num_epochs = 1
  config.eval.num_sampled_negatives = 0
  assert jax.device_count() == 4 and config.train.num_devices == 0  # all four
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["test/cold/count"] + result["test/warm/count"] == result["test/count"]
  assert 0.0 <= result["test/cold/ndcg@10"] <= 1.0
  # The restored run scores with the same pictures.
  trainer, params, _ = train.load_trained(str(tmp_path))
  assert trainer.images is not None and trainer.images.shape[1:] == (SIZE, SIZE, 3)
  # Withheld items' id rows start at zero and, never trained, stay there.
  table = np.asarray(models.item_table(params, trainer.dataset.num_items))
  cold = trainer.dataset.withheld_items
  assert len(cold) and not table[cold].any() and table[np.setdiff1d(np.arange(1, 41), cold)].any()
  assert trainer.evaluate(params, "test")["ndcg@10"] == pytest.approx(result["test/ndcg@10"])


def test_recommend_with_pictures():
  config = tiny.get_config("rnn")
  config.model.item_encoder = "image"
  config.model.update(TOWER)
  config.data.images.size = SIZE
  config.train.num_devices = 1
  trainer = train.Trainer(config, builders.load(config.data))
  params = trainer.init_state()["params"]
  history = np.asarray(trainer.dataset.source[0]["item_seq"])[:4]
  (ranked,) = recommend.recommend(trainer, params, [history], top_k=5)
  assert len(ranked) == 5
  ids = [trainer.dataset.item_ids[i] for i in history]
  assert not set(ids) & {item for item, _ in ranked}
  # The same order as scoring every item by hand with the pictures' vectors.
  vectors = models.item_vectors(trainer.model, params, trainer.dataset.num_items, trainer.images)
  seq = jnp.asarray(history[None], jnp.int32)
  scores = np.array(evaluate.score_items(trainer.model, params, trainer.dataset.num_items, seq,
                                          item_vectors=vectors))[0]
  scores[0], scores[history] = -np.inf, -np.inf
  np.testing.assert_array_equal([i for i, _ in ranked],
                                trainer.dataset.item_ids[np.argsort(-scores)[:5]])


def test_caser_image_encoder_train_step():
  """A window-task step with pictures: finite loss, the tower trains, only batch pictures."""
  images = _images()
  model = _model("caser", "image", dropout_rate=0.0)
  seq = _item_seq()
  params = models.init_params(model, jax.random.key(0), seq, user=USER, images=images)
  tx = optimizers.create_optimizer(tiny.get_config("caser").train, 10)
  state = dict(params=params, opt_state=tx.init(params), step=jnp.int32(0),
               rng=jax.random.key_data(jax.random.key(0, impl=train.DROPOUT_RNG_IMPL)))
  batch = {"item_seq": seq, "targets": jnp.array([[4, 6], [9, 11]], jnp.int32),
           "negatives": jnp.array([[[8], [10]], [[1], [3]]], jnp.int32), "user": USER}
  step = train.make_train_step(model, tx, loss="bce", num_items=NUM_ITEMS, images=images)
  sizes = _conv_batch_sizes(jax.make_jaxpr(step)(state, batch).jaxpr)
  distinct = len(set(np.concatenate([np.ravel(batch[k]) for k in ("item_seq", "targets",
                                                                 "negatives")]).tolist()))
  assert sizes and max(sizes) >= distinct and max(sizes) <= NUM_ITEMS + 1, sizes
  new_state, metrics = jax.jit(step)(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params[image_cnn.IMAGE_TOWER],
                       new_state["params"][image_cnn.IMAGE_TOWER])
  assert all(jax.tree.leaves(moved))


# ~22 s: resume exactness is a default test in test_train.py (SIGKILL), and the
# pictures-in-the-batch step in the two tests above.
@pytest.mark.slow
def test_resume_with_pictures_in_the_batch_is_exact(tmp_path):
  """A run resumed from its mid-run checkpoint ends where the straight run ends."""
  config = tiny.get_config("sasrec")
  config.model.item_encoder = "id+image"
  config.model.update(TOWER)
  config.data.images.size = SIZE
  config.train.update(num_epochs=2, num_devices=1, keep_checkpoints=3)
  config.eval.num_sampled_negatives = 0
  straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
  # Cut the finished run back to its first epoch's checkpoint, as a crash would.
  resumed_dir = tmp_path / "resumed"
  shutil.copytree(tmp_path / "straight", resumed_dir)
  steps = sorted(int(p.name) for p in (resumed_dir / "checkpoints").iterdir() if p.name.isdigit())
  assert len(steps) == 2, steps  # one per epoch
  shutil.rmtree(resumed_dir / "checkpoints" / str(steps[-1]))
  (resumed_dir / "final_metrics.json").unlink()
  resumed = train.train_and_evaluate(config, str(resumed_dir))
  assert resumed.keys() == straight.keys()
  # Every metric of both splits, from the best checkpoint's parameters.
  for name, value in straight.items():
    np.testing.assert_allclose(resumed[name], value, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("name", ["sasrec", "bert4rec", "rnn", "caser"])
def test_precomputed_features_are_projected_linearly(name):
  """data.images.source='features': item vectors = table + F W (VBPR), float64 reference."""
  features = np.random.default_rng(1).normal(size=(NUM_ITEMS + 1, 7)).astype(np.float32)
  features[0] = 0.0
  model = _model(name, "id+image")
  seq = _item_seq()
  if name == "bert4rec":
    seq = seq.at[:, -1].set(NUM_ITEMS + 1)
  params = models.init_params(model, jax.random.key(0), seq, user=USER, images=features)
  assert image_cnn.FEATURE_PROJECTION in params and image_cnn.IMAGE_TOWER not in params
  kernel = np.float64(params[image_cnn.FEATURE_PROJECTION]["kernel"])
  assert kernel.shape == (7, model.dim)
  table = np.float64(models.item_table(params, NUM_ITEMS))
  projected = np.float64(features) @ kernel
  vectors = models.item_vectors(model, params, NUM_ITEMS, features)
  np.testing.assert_allclose(vectors, table + projected, rtol=1e-5, atol=1e-6)
  only = _model(name, "image")
  only_params = models.init_params(only, jax.random.key(0), seq, user=USER, images=features)
  np.testing.assert_allclose(
      models.item_vectors(only, only_params, NUM_ITEMS, features),
      np.float64(features) @ np.float64(only_params[image_cnn.FEATURE_PROJECTION]["kernel"]),
      rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # ~25 s of CPU: a whole run (the projection's math is the test above)
def test_a_run_trains_the_projection_of_precomputed_features(tmp_path):
  """A tiny run with features from an .npz: trains, evaluates, and moves the projection."""
  config = tiny.get_config("sasrec")
  config.model.item_encoder = "image"
  config.data.data_dir = str(tmp_path / "tfds")
  dataset = builders.load(config.data)
  pictures = np.random.default_rng(2).normal(size=(dataset.num_items, 6)).astype(np.float32)
  np.savez(tmp_path / "features.npz", features=pictures, item_ids=dataset.item_ids[1:])
  config.data.images.update(source="features", path=str(tmp_path / "features.npz"))
  config.train.num_epochs = 1
  trainer = train.Trainer(config, dataset)
  assert trainer.images.shape == (dataset.num_items + 1, 6)
  initial = trainer.init_state()["params"][image_cnn.FEATURE_PROJECTION]["kernel"]
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert 0.0 <= result["test/ndcg@10"] <= 1.0
  _, params, _ = train.load_trained(str(tmp_path / "run"))
  assert np.abs(np.asarray(params[image_cnn.FEATURE_PROJECTION]["kernel"]) - initial).max() > 0
