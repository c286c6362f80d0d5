"""The exported artifact, its jax-only loader and the HTTP server, against the library."""

import concurrent.futures
import dataclasses
import http.client
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from deeprec_jax import recommend, run_config, train
from deeprec_jax.data import builders, pipeline
from deeprec_jax.serving import artifact as artifact_lib
from deeprec_jax.serving import exporter, server
from experiments.configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("sasrec", "bert4rec", "rnn", "caser")
IMAGE = "sasrec+image"  # SASRec with model.item_encoder='image': vectors precomputed at export.
TOP_K = 12


def _image_config():
  """Tiny SASRec whose item vectors are its (tiny) image tower over synthetic pictures."""
  config = tiny.get_config("sasrec")
  config.model.update(item_encoder="image", image_channels=(3,), image_dense=4)
  config.data.images.size = 8
  return config


def _remapped(dataset, *, permute=False):
  """The dataset with original ids unlike the model ids, so a missing map shows.

  ``permute``: the original ids reversed instead (still the generator's ids,
  which the synthetic pictures are drawn by).
  """
  if permute:
    item_ids = np.concatenate([dataset.item_ids[:1], dataset.item_ids[:0:-1]])
  else:
    item_ids = np.where(np.arange(dataset.num_items + 1) > 0, dataset.item_ids * 10 + 7, -1)
  return dataclasses.replace(dataset, item_ids=item_ids, user_ids=dataset.user_ids * 3 + 100)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Per family (and ``IMAGE``): ``(trainer, params, artifact dir, workdir or None)``.

  SASRec is trained for one epoch and exported from its workdir by the
  binary; the others export their initial params (``export_trained``).
  """
  out = {}
  workdir = str(tmp_path_factory.mktemp("sasrec_run"))
  config = tiny.get_config("sasrec")
  config.train.num_epochs = 1
  train.train_and_evaluate(config, workdir)
  trainer, params, _ = train.load_trained(workdir)
  directory = str(tmp_path_factory.mktemp("artifacts") / "sasrec")
  result = subprocess.run(
      [sys.executable, "-m", "experiments.export", f"--workdir={workdir}", f"--out={directory}",
       f"--top_k={TOP_K}"], cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, XLA_FLAGS=""))
  assert result.returncode == 0, result.stderr[-3000:]
  out["sasrec"] = (trainer, params, directory, workdir)
  for family in FAMILIES[1:] + (IMAGE,):
    config = _image_config() if family == IMAGE else tiny.get_config(family)
    trainer = train.Trainer(config, _remapped(builders.load(config.data),
                                              permute=family == IMAGE))
    params = trainer.init_state()["params"]
    directory = str(tmp_path_factory.mktemp("artifacts") / family)
    exporter.export_trained(trainer, params, directory, top_k=TOP_K)
    out[family] = (trainer, params, directory, None)
  return out


def _queries(trainer, seed=0):
  """Histories (model ids) of several lengths, some longer than max_len, and users."""
  rng = np.random.default_rng(seed)
  max_len, num_items = trainer.config.data.max_len, trainer.dataset.num_items
  lengths = (1, 3, max_len - 1, max_len, max_len + 4, 3 * max_len)
  histories = [rng.integers(1, num_items + 1, size=n) for n in lengths]
  histories.append(np.asarray(trainer.dataset.source[5]["item_seq"]))
  users = [int(u) for u in rng.integers(0, trainer.dataset.num_users, size=len(histories))]
  return histories, users


def _original(trainer, histories, users):
  dataset = trainer.dataset
  return ([[int(dataset.item_ids[i]) for i in h] for h in histories],
          [int(dataset.user_ids[u]) for u in users])


def _assert_same(got, expected):
  assert len(got) == len(expected)
  for row, want in zip(got, expected, strict=True):
    assert [int(item) for item, _ in row] == [item for item, _ in want]
    np.testing.assert_allclose([s for _, s in row], [s for _, s in want], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("task, history, expected", [
    ("autoregressive", [3, 4, 5, 6, 7, 8], [4, 5, 6, 7, 8]),
    ("autoregressive", [3, 4], [0, 0, 0, 3, 4]),
    ("window", [3, 4, 5, 6, 7, 8], [4, 5, 6, 7, 8]),
    ("masked", [3, 4, 5, 6, 7, 8], [5, 6, 7, 8, 31]),
    ("masked", [3], [0, 0, 0, 3, 31]),
    ("masked", [], [0, 0, 0, 0, 31]),
])
def test_model_input_is_the_pipelines_eval_input(task, history, expected):
  # One numpy-only rule (deeprec_jax.inputs) for evaluation batches and the loader.
  assert artifact_lib.model_input is pipeline.eval_input
  got = artifact_lib.model_input(np.asarray(history, np.int64), task=task, max_len=5,
                                 num_items=30)
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, expected)


def test_artifact_matches_the_library_in_a_fresh_process(runs, tmp_path):
  """Every family and IMAGE: same ids, same scores after deserializing in a new process."""
  queries, expected = {}, {}
  for family, (trainer, params, directory, _) in runs.items():
    histories, users = _queries(trainer)
    needs_user = trainer.task == "window"
    expected[family] = recommend.recommend(trainer, params, histories, top_k=7,
                                           users=users if needs_user else None)
    original, original_users = _original(trainer, histories, users)
    queries[family] = {"dir": directory, "histories": original,
                       "users": original_users if needs_user else None}
  (tmp_path / "queries.json").write_text(json.dumps(queries))
  script = textwrap.dedent("""
      import json, sys
      from deeprec_jax import serving
      queries = json.load(open(sys.argv[1]))
      out = {}
      for family, q in queries.items():
        artifact = serving.load(q["dir"])
        out[family] = {"top": artifact.recommend(q["histories"], 7, users=q["users"]),
                       "platforms": list(artifact.platforms)}
      heavy = ("flax", "optax", "orbax", "grain", "tensorflow_datasets", "ml_collections",
               "deeprec_jax.models", "deeprec_jax.data", "deeprec_jax.train")
      out["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in heavy
                               or m.startswith(heavy[-3:]))
      print(json.dumps(out))
      """)
  result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "queries.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, XLA_FLAGS=""))
  assert result.returncode == 0, result.stderr[-3000:]
  got = json.loads(result.stdout.strip().splitlines()[-1])
  assert got.pop("imported") == []  # jax + numpy only: no Flax, no data or model code.
  for family in runs:
    assert "cpu" in got[family]["platforms"]
    _assert_same(got[family]["top"], expected[family])


def test_manifest_and_params_are_beside_the_function(runs, tmp_path):
  trainer, _, directory, workdir = runs["sasrec"]
  with open(os.path.join(directory, artifact_lib.MANIFEST), encoding="utf-8") as f:
    manifest = json.load(f)
  assert manifest["model"] == "sasrec" and manifest["task"] == "autoregressive"
  assert manifest["config_hash"] == exporter.config_hash(run_config.load(workdir))
  assert manifest["top_k"] == TOP_K and manifest["max_len"] == trainer.config.data.max_len
  assert manifest["platforms"][0] == "cpu" and manifest["needs_user"] is False
  assert manifest["num_items"] == trainer.dataset.num_items and manifest["created_at"]
  for family, (_, _, other, _) in runs.items():
    assert artifact_lib.load(other).needs_user == (family == "caser")
  np.testing.assert_array_equal(np.load(os.path.join(directory, artifact_lib.ITEM_IDS)),
                                trainer.dataset.item_ids)

  # The params are arguments, not constants: a zeroed item table zeroes every score.
  copy = str(tmp_path / "zeroed")
  shutil.copytree(directory, copy)
  with np.load(os.path.join(directory, artifact_lib.PARAMS)) as stored:
    params = {name: stored[name] for name in stored.files}
  params["item_embed/embedding"] = np.zeros_like(params["item_embed/embedding"])
  np.savez(os.path.join(copy, artifact_lib.PARAMS), **params)
  history = [int(i) for i in trainer.dataset.item_ids[1:4]]
  assert {s for _, s in artifact_lib.load(copy).recommend([history], 5)[0]} == {0.0}
  assert {s for _, s in artifact_lib.load(directory).recommend([history], 5)[0]} != {0.0}


def test_image_encoder_artifact_scores_the_vectors_stored_at_export(runs, tmp_path):
  trainer, params, directory, _ = runs[IMAGE]
  with open(os.path.join(directory, artifact_lib.MANIFEST), encoding="utf-8") as f:
    manifest = json.load(f)
  num_rows = trainer.dataset.num_items + 1
  assert manifest["format_version"] == 2 and manifest["item_encoder"] == "image"
  assert manifest["files"]["item_vectors"] == artifact_lib.ITEM_VECTORS
  assert manifest["item_vectors_shape"] == [num_rows, trainer.config.model.dim]
  assert "item_vectors float32" in manifest["signature"]
  stored = np.load(os.path.join(directory, artifact_lib.ITEM_VECTORS))
  assert stored.dtype == np.float32
  # What evaluation and recommend score against (the tower over the run's pictures).
  np.testing.assert_allclose(stored, trainer.item_vectors(params), rtol=1e-6, atol=1e-6)
  assert np.abs(stored[1:]).sum(axis=1).min() > 0 and not stored[0].any()

  # The vectors are an argument, not recomputed per request: zeroed, every score is 0.
  copy = str(tmp_path / "zeroed")
  shutil.copytree(directory, copy)
  np.save(os.path.join(copy, artifact_lib.ITEM_VECTORS), np.zeros_like(stored))
  history = [int(i) for i in trainer.dataset.item_ids[1:4]]
  assert {s for _, s in artifact_lib.load(copy).recommend([history], 5)[0]} == {0.0}
  assert {s for _, s in artifact_lib.load(directory).recommend([history], 5)[0]} != {0.0}
  np.save(os.path.join(copy, artifact_lib.ITEM_VECTORS), stored[:-1])
  with pytest.raises(ValueError, match="item_vectors.npy has shape"):
    artifact_lib.load(copy)

  # Without the vectors an image model cannot be exported; an id model takes none.
  common = dict(model_name="sasrec", task="autoregressive", num_items=num_rows - 1,
                item_ids=trainer.dataset.item_ids, user_ids=trainer.dataset.user_ids,
                max_len=trainer.config.data.max_len)
  with pytest.raises(ValueError, match="give item_vectors"):
    exporter.write_artifact(str(tmp_path / "none"), model=trainer.model, params=params, **common)
  id_trainer, id_params, _, _ = runs["sasrec"]
  with pytest.raises(ValueError, match="only for image item encoders"):
    exporter.write_artifact(str(tmp_path / "none"), model=id_trainer.model, params=id_params,
                            item_vectors=stored, **common)


def test_id_artifacts_keep_format_1_and_unknown_formats_are_refused(runs, tmp_path):
  for family in FAMILIES:
    directory = runs[family][2]
    with open(os.path.join(directory, artifact_lib.MANIFEST), encoding="utf-8") as f:
      manifest = json.load(f)
    # Format 1, as before image encoders: readers of format 1 still read it.
    assert manifest["format_version"] == 1 and "item_vectors" not in manifest["files"]
    assert not os.path.exists(os.path.join(directory, artifact_lib.ITEM_VECTORS))
    assert artifact_lib.load(directory).item_encoder == "id"
  copy = str(tmp_path / "future")
  shutil.copytree(runs["sasrec"][2], copy)
  with open(os.path.join(copy, artifact_lib.MANIFEST), encoding="utf-8") as f:
    manifest = json.load(f)
  manifest["format_version"] = artifact_lib.FORMAT_VERSION + 1
  with open(os.path.join(copy, artifact_lib.MANIFEST), "w", encoding="utf-8") as f:
    json.dump(manifest, f)
  with pytest.raises(ValueError, match="reads formats 1, 2"):
    artifact_lib.load(copy)


def test_loader_names_unknown_ids_and_checks_its_input(runs):
  trainer, _, directory, _ = runs["sasrec"]
  artifact = artifact_lib.load(directory)
  known = [int(i) for i in trainer.dataset.item_ids[1:4]]
  with pytest.raises(artifact_lib.UnknownIdError, match="999999") as error:
    artifact.recommend([known, known + [999999, -5, 999999]], 3)
  assert error.value.items == {1: [999999, -5]}
  for k in (0, TOP_K + 1, 2.5, True):
    with pytest.raises(ValueError, match="k="):
      artifact.recommend([known], k)
  with pytest.raises(ValueError, match="empty"):
    artifact.recommend([[]], 3)
  with pytest.raises(ValueError, match="integer"):
    artifact.recommend([[1.5]], 3)
  # Without exclusion the history's items may come back; with it they never do.
  assert not {i for i, _ in artifact.recommend([known], TOP_K)[0]} & set(known)
  assert len(artifact.recommend([known], TOP_K, exclude_seen=False)[0]) == TOP_K

  caser_trainer, _, caser_dir, _ = runs["caser"]
  caser = artifact_lib.load(caser_dir)
  history = [int(i) for i in caser_trainer.dataset.item_ids[1:4]]
  with pytest.raises(ValueError, match="user"):
    caser.recommend([history], 3)
  with pytest.raises(artifact_lib.UnknownIdError, match="user ids") as error:
    caser.recommend([history], 3, users=[-1])
  assert error.value.users == [-1]


def test_micro_batcher_runs_queued_requests_together(runs):
  trainer, params, directory, _ = runs["sasrec"]
  artifact = artifact_lib.load(directory)
  histories, _ = _queries(trainer, seed=2)
  rows = artifact.encode(_original(trainer, histories, [0] * len(histories))[0])
  # Batch sizes 1, 2, 4 at the one exclusion width the tiny dataset needs.
  assert artifact.warm_up(4) == 3 and artifact.shapes_run == {(1, 256), (2, 256), (4, 256)}
  batcher = server.MicroBatcher(artifact, max_batch=8, max_wait_s=0.5, start=False)
  jobs = [([rows[i]], 1 + i) for i in range(5)] + [(rows[:3], 4), (rows[3:5], 2)]
  futures = [batcher.submit(job_rows, k) for job_rows, k in jobs]
  batcher.start()  # Everything is queued already: 5 + 3 rows, then 2.
  results = [f.result(timeout=60) for f in futures]
  batcher.close()
  assert batcher.stats == {"requests": 7, "batches": 2, "rows": 10, "padded_rows": 10}
  expected = recommend.recommend(trainer, params, histories, top_k=5)
  for (job_rows, k), got in zip(jobs, results, strict=True):
    want = [expected[next(i for i, r in enumerate(rows) if r is row)][:k] for row in job_rows]
    _assert_same(got, want)


@pytest.fixture(scope="module")
def sasrec_server(runs):
  artifact = artifact_lib.load(runs["sasrec"][2])
  httpd = server.make_server(artifact, port=0, max_batch=8, max_wait_s=0.005,
                             max_histories=16)
  httpd.start()
  yield httpd
  httpd.close()


def _request(url, method, path, body=None, raw=None):
  host, port = url.removeprefix("http://").split(":")
  connection = http.client.HTTPConnection(host, int(port), timeout=60)
  data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
  connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
  response = connection.getresponse()
  status, payload = response.status, json.loads(response.read())
  connection.close()
  return status, payload


def test_server_answers_concurrent_requests(runs, sasrec_server):
  trainer, params, _, _ = runs["sasrec"]
  histories, _ = _queries(trainer, seed=3)
  original = _original(trainer, histories, [0] * len(histories))[0]
  expected = recommend.recommend(trainer, params, histories, top_k=TOP_K)
  rng = np.random.default_rng(0)
  requests = []
  for _ in range(24):
    k = int(rng.integers(1, TOP_K + 1))
    picks = rng.choice(len(histories), size=int(rng.integers(1, 4)))
    if len(picks) == 1:
      requests.append(({"history": original[picks[0]], "k": k}, picks, k))
    else:
      requests.append(({"histories": [original[i] for i in picks], "k": k}, picks, k))

  def send(request):
    return _request(sasrec_server.url, "POST", "/recommend", request[0])

  with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
    answers = list(pool.map(send, requests))
  for (body, picks, k), (status, payload) in zip(requests, answers, strict=True):
    assert status == 200, payload
    got = [payload["recommendations"]] if "history" in body else payload["recommendations"]
    _assert_same([[(r["item"], r["score"]) for r in top] for top in got],
                 [expected[i][:k] for i in picks])
  status, health = _request(sasrec_server.url, "GET", "/healthz")
  assert status == 200 and health["status"] == "ok" and health["model"] == "sasrec"
  assert health["requests"] >= len(requests) and health["batches"] <= health["requests"]


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"k": 3}, 400, "exactly one of"),
    ({"history": [1], "histories": [[1]]}, 400, "exactly one of"),
    ({"history": [1, "2"]}, 400, "integer ids"),
    ({"history": [True]}, 400, "integer ids"),
    ({"histories": []}, 400, "non-empty"),
    ({"histories": [[1]] * 17}, 413, "at most 16"),
    ({"history": [1], "k": 0}, 400, "k: expected an integer in"),
    ({"history": [1], "k": TOP_K + 1}, 400, "k: expected an integer in"),
    ({"history": [1], "k": "3"}, 400, "k: expected an integer in"),
    ({"history": [1], "top": 3}, 400, "unknown field"),
    ({"history": []}, 400, "empty"),
    ({"history": [1], "exclude_seen": 1}, 400, "exclude_seen"),
    ({"histories": [[1], [999999, 1]]}, 422, "999999"),
])
def test_server_rejects_bad_requests_clearly(sasrec_server, body, status, message):
  raw = body if isinstance(body, bytes) else None
  got_status, payload = _request(sasrec_server.url, "POST", "/recommend",
                                 None if raw else body, raw=raw)
  assert got_status == status and message in payload["error"], payload
  if status == 422:
    assert payload["unknown_items"] == [{"history": 1, "items": [999999]}]


def test_server_paths_methods_and_caser_users(runs, sasrec_server):
  assert _request(sasrec_server.url, "GET", "/nowhere")[0] == 404
  assert _request(sasrec_server.url, "POST", "/nowhere", {"history": [1]})[0] == 404
  assert _request(sasrec_server.url, "GET", "/recommend")[0] == 405
  assert _request(sasrec_server.url, "DELETE", "/recommend")[0] == 405

  trainer, params, directory, _ = runs["caser"]
  histories, users = _queries(trainer, seed=4)
  original, original_users = _original(trainer, histories, users)
  expected = recommend.recommend(trainer, params, histories[:2], top_k=5, users=users[:2])
  httpd = server.make_server(artifact_lib.load(directory), port=0)
  httpd.start()
  try:
    status, payload = _request(httpd.url, "POST", "/recommend",
                               {"histories": original[:2], "users": original_users[:2], "k": 5})
    assert status == 200, payload
    _assert_same([[(r["item"], r["score"]) for r in top] for top in payload["recommendations"]],
                 expected)
    status, payload = _request(httpd.url, "POST", "/recommend", {"history": original[0]})
    assert status == 400 and '"user"' in payload["error"]
    status, payload = _request(httpd.url, "POST", "/recommend",
                               {"history": original[0], "user": -1})
    assert status == 422 and payload["unknown_users"] == [-1]
  finally:
    httpd.close()


def test_shorter_max_len_keeps_the_most_recent_items(runs, tmp_path):
  """--max_len=4: the model sees the last 4 items, as the library does with them alone."""
  trainer, params, _, _ = runs["sasrec"]
  directory = str(tmp_path / "short")
  assert exporter.export_trained(trainer, params, directory, top_k=5, max_len=4)["max_len"] == 4
  histories, _ = _queries(trainer, seed=5)
  original = _original(trainer, histories, [0] * len(histories))[0]
  got = artifact_lib.load(directory).recommend(original, 5, exclude_seen=False)
  _assert_same(got, recommend.recommend(trainer, params, [h[-4:] for h in histories], top_k=5,
                                        exclude_seen=False))
  with pytest.raises(ValueError, match="max_len"):
    exporter.export_trained(trainer, params, directory, max_len=trainer.config.data.max_len + 1)
  caser_trainer, caser_params, _, _ = runs["caser"]
  with pytest.raises(ValueError, match="window"):
    exporter.export_trained(caser_trainer, caser_params, directory, max_len=2)
