"""Item pictures: synthetic drawing (determinism, shapes, cluster signal), files, the cache."""

import os
import re

import numpy as np
import pytest
from PIL import Image

from deeprec_jax.data import builders, images, sources, synthetic
from experiments.configs import tiny


def _data_config(size=16):
  config = tiny.get_config("sasrec").data
  config.images.size = size
  return config


def test_item_clusters_are_the_generators():
  # generate() draws the same permutation first: items of one cluster share it.
  clusters = synthetic.item_clusters(40, 4, seed=3)
  assert clusters.shape == (40,) and set(clusters.tolist()) == {0, 1, 2, 3}
  rng = np.random.default_rng(3)
  np.testing.assert_array_equal(clusters, rng.permutation(40) % 4)


def test_synthetic_pictures_are_deterministic_and_shaped():
  clusters = synthetic.item_clusters(40, 4, seed=0)
  a = images.draw_synthetic(clusters, 4, 16, seed=0)
  b = images.draw_synthetic(clusters, 4, 16, seed=0)
  c = images.draw_synthetic(clusters, 4, 16, seed=1)
  assert a.shape == (40, 16, 16, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert len({x.tobytes() for x in a}) == 40  # every item has its own picture


def test_pictures_of_one_cluster_are_closer():
  clusters = synthetic.item_clusters(100, 10, seed=0)
  pictures = images.draw_synthetic(clusters, 10, 32, seed=0).reshape(100, -1) / 255.0
  distance = np.sqrt(((pictures[:, None] - pictures[None]) ** 2).sum(-1))
  same = clusters[:, None] == clusters[None]
  off_diagonal = ~np.eye(100, dtype=bool)
  within = distance[same & off_diagonal].mean()
  across = distance[~same].mean()
  assert within < 0.75 * across, (within, across)
  # Nearest neighbours (other than itself) mostly share the cluster: by pixels
  # (shapes move a little), and nearly always by mean colour.
  np.fill_diagonal(distance, np.inf)
  assert (clusters[distance.argmin(1)] == clusters).mean() > 0.7
  colour = pictures.reshape(100, -1, 3).mean(1)
  distance = np.sqrt(((colour[:, None] - colour[None]) ** 2).sum(-1))
  np.fill_diagonal(distance, np.inf)
  assert (clusters[distance.argmin(1)] == clusters).mean() > 0.95


def test_dataset_table_follows_remapped_ids(tmp_path):
  config = _data_config()
  config.data_dir = str(tmp_path)  # Its own cache: other tests add pictures of other settings.
  dataset = builders.load(config)
  table = images.load(config, dataset)
  assert table.images.shape == (dataset.num_items + 1, 16, 16, 3)
  assert table.images.dtype == np.uint8 and not table.images[0].any()
  assert table.num_missing == 0
  s = config.synthetic
  drawn = images.draw_synthetic(synthetic.item_clusters(s.num_items, s.num_clusters, s.seed),
                                s.num_clusters, 16, s.seed)
  np.testing.assert_array_equal(table.images[1:], drawn[dataset.item_ids[1:] - 1])
  # Cached beside the dataset, keyed by size: a new size is a new file.
  folder = builders.get_builder(config).data_dir
  names = sorted(n for n in os.listdir(folder) if n.startswith("item_images-"))
  assert len(names) == 2 and all("16px" in n for n in names)
  np.testing.assert_array_equal(images.load(config, dataset).images, table.images)
  config.images.size = 8
  assert images.load(config, dataset).images.shape[1:] == (8, 8, 3)
  assert len([n for n in os.listdir(folder) if n.startswith("item_images-")]) == 4
  # The sequences' cache does not depend on the picture settings.
  assert builders.get_builder(config).data_dir == folder


def _write(path, colour, size=(10, 6)):
  Image.new("RGB", size, colour).save(path)


def test_folder_and_manifest(tmp_path):
  folder = tmp_path / "pictures"
  folder.mkdir()
  _write(folder / "7.png", (255, 0, 0))
  _write(folder / "9.jpg", (0, 0, 255))
  (folder / "notes.txt").write_text("not a picture")
  item_ids = np.array([-1, 7, 8, 9])
  table = images.read_files(item_ids, str(folder), 4)
  assert table.images.shape == (4, 4, 4, 3)
  np.testing.assert_array_equal(table.images[1], np.full((4, 4, 3), (255, 0, 0)))
  assert abs(int(table.images[3, ..., 2].mean()) - 254) <= 2  # JPEG is lossy.
  np.testing.assert_array_equal(table.missing, [False, False, True, False])
  assert table.num_missing == 1 and not table.images[2].any() and not table.images[0].any()

  manifest = tmp_path / "manifest.csv"
  manifest.write_text("item_id,path\n8,pictures/7.png\n9,pictures/absent.png\n")
  table = images.read_files(item_ids, str(manifest), 4)
  np.testing.assert_array_equal(table.missing, [False, True, False, True])
  np.testing.assert_array_equal(table.images[2], np.full((4, 4, 3), (255, 0, 0)))


def test_bad_inputs(tmp_path):
  broken = tmp_path / "3.png"
  broken.write_bytes(b"not a png at all")
  with pytest.raises(sources.DataFormatError, match="3.png"):
    images.read_files(np.array([-1, 3]), str(tmp_path), 4)
  bad_header = tmp_path / "m.csv"
  bad_header.write_text("id,file\n3,3.png\n")
  with pytest.raises(sources.DataFormatError, match="item_id,path"):
    images.read_files(np.array([-1, 3]), str(bad_header), 4)
  bad_id = tmp_path / "n.csv"
  bad_id.write_text("item_id,path\nx,3.png\n")
  with pytest.raises(sources.DataFormatError, match="line 2"):
    images.read_files(np.array([-1, 3]), str(bad_id), 4)
  with pytest.raises(sources.DataFormatError, match="no such folder"):
    images.read_files(np.array([-1, 3]), str(tmp_path / "absent"), 4)
  config = _data_config()
  config.images.source = ""
  with pytest.raises(ValueError, match="data.images.source"):
    images.settings(config)
  config.images.source, config.images.size = "synthetic", 2
  with pytest.raises(ValueError, match="data.images.size"):
    images.settings(config)
  config.images.size, config.name = 16, "ml-100k"
  with pytest.raises(ValueError, match="synthetic dataset only"):
    images.settings(config)
  config.images.source = "files"
  with pytest.raises(sources.DataFormatError, match="data.images.path"):
    images.settings(config)


def _write_features(tmp_path, ids, dim=5, seed=0):
  features = np.random.default_rng(seed).normal(size=(len(ids), dim)).astype(np.float32)
  path = tmp_path / "features.npz"
  np.savez(path, features=features, item_ids=np.asarray(ids, np.int64))
  return str(path), features


def test_precomputed_features_follow_the_item_ids(tmp_path):
  """'features': rows by original id (.npz, or .npy + an id file); absent items are zeros."""
  item_ids = np.array([-1, 30, 10, 20, 99])  # Dataset.item_ids: row -> original id
  path, features = _write_features(tmp_path, [10, 20, 30, 40])
  table = images.read_features(item_ids, path)
  assert table.images.dtype == np.float32 and table.images.shape == (5, 5)
  np.testing.assert_array_equal(table.images[1:4], features[[2, 0, 1]])
  assert not table.images[0].any() and not table.images[4].any()
  np.testing.assert_array_equal(table.missing, [False, False, False, False, True])
  np.save(tmp_path / "features.npy", features)
  (tmp_path / "ids.txt").write_text("10\n20\n\n30\n40\n")
  from_npy = images.read_features(item_ids, str(tmp_path / "features.npy"),
                                  str(tmp_path / "ids.txt"))
  np.testing.assert_array_equal(from_npy.images, table.images)


def test_precomputed_features_bad_inputs_name_the_file(tmp_path):
  item_ids = np.array([-1, 1])
  cases = {
      "wrong_keys.npz": dict(feats=np.zeros((1, 2), np.float32), item_ids=np.array([1])),
      "three_d.npz": dict(features=np.zeros((1, 2, 2), np.float32), item_ids=np.array([1])),
      "ints.npz": dict(features=np.zeros((1, 2), np.int32), item_ids=np.array([1])),
      "nan.npz": dict(features=np.array([[0.0, np.nan]], np.float32), item_ids=np.array([1])),
      "counts.npz": dict(features=np.zeros((2, 2), np.float32), item_ids=np.array([1])),
      "repeated.npz": dict(features=np.zeros((2, 2), np.float32), item_ids=np.array([1, 1])),
      "float_ids.npz": dict(features=np.zeros((1, 2), np.float32), item_ids=np.array([1.5])),
  }
  expected = {"wrong_keys.npz": "'features' and 'item_ids'", "three_d.npz": "2-D float",
              "ints.npz": "2-D float", "nan.npz": "row 0 is not finite",
              "counts.npz": "1 item ids for 2 feature rows", "repeated.npz": "more than once",
              "float_ids.npz": "1-D integer"}
  for name, arrays in cases.items():
    np.savez(tmp_path / name, **arrays)
    with pytest.raises(sources.DataFormatError, match=re.escape(expected[name])) as error:
      images.read_features(item_ids, str(tmp_path / name))
    assert name in str(error.value)
  (tmp_path / "truncated.npz").write_bytes(b"PK\x03\x04 not a zip")
  with pytest.raises(sources.DataFormatError, match="truncated.npz: cannot read"):
    images.read_features(item_ids, str(tmp_path / "truncated.npz"))
  np.save(tmp_path / "rows.npy", np.zeros((1, 2), np.float32))
  with pytest.raises(sources.DataFormatError, match="data.images.item_ids"):
    images.read_features(item_ids, str(tmp_path / "rows.npy"))
  (tmp_path / "ids.txt").write_text("1\nten\n")
  with pytest.raises(sources.DataFormatError, match=r"ids.txt, line 2: item id 'ten'"):
    images.read_features(item_ids, str(tmp_path / "rows.npy"), str(tmp_path / "ids.txt"))
  config = _data_config()
  config.images.source, config.images.path = "features", str(tmp_path / "rows.npy")
  config.images.item_ids = str(tmp_path / "absent.txt")
  with pytest.raises(sources.DataFormatError, match="data.images.item_ids"):
    images.settings(config)


def test_features_table_is_cached_by_its_file(tmp_path):
  config = _data_config()
  config.data_dir = str(tmp_path / "tfds")
  dataset = builders.load(config)
  path, _ = _write_features(tmp_path, dataset.item_ids[1:], dim=3)
  config.images.source, config.images.path = "features", path
  table = images.load(config, dataset)
  assert table.images.shape == (dataset.num_items + 1, 3) and table.num_missing == 0
  cached = [n for n in os.listdir(builders.get_builder(config).data_dir)
            if n.startswith("item_images-features-")]
  assert len(cached) == 2  # the table and its missing flags
  _write_features(tmp_path, dataset.item_ids[1:], dim=4, seed=1)  # the file changes
  assert images.load(config, dataset).images.shape == (dataset.num_items + 1, 4)
