r"""Top-K recommendations from a trained model, in the dataset's original ids.

  python -m experiments.recommend --workdir=/tmp/sasrec_ml1m --history=1193,661,914
  python -m experiments.recommend --workdir=/tmp/sasrec_ml1m --histories_file=users.txt
  python -m experiments.recommend --workdir=/tmp/caser_ml1m --user=42

``--histories_file`` holds one history per line: the dataset's original item
ids, oldest first, separated by commas or spaces; empty lines are skipped.
The output is one JSON object per answered line: ``{"recommendations":
[{"item": id, "score": s}, ...]}`` (``--show_history`` adds the input). A line
with an unknown id or a non-integer is reported on stderr and skipped; the
other lines are answered. ``--user`` names a user of the dataset (original
id): the history is then that user's whole sequence unless ``--history`` gives
one, and personalized models (Caser) get the user's id.
"""

import json
import re
import sys

from absl import app, flags

from deeprec_jax import recommend, train
from experiments import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory written by experiments.train.",
                               required=True)
_HISTORY = flags.DEFINE_list("history", [], "Item ids the user interacted with, oldest first.")
_HISTORIES_FILE = flags.DEFINE_string("histories_file", "",
                                      "File with one history per line (batch mode).")
_USER = flags.DEFINE_integer("user", None, "Original id of a user of the dataset (needed by "
                             "Caser); without --history, the user's whole sequence.")
_TOP_K = flags.DEFINE_integer("top_k", 10, "How many items to recommend.")
_INCLUDE_SEEN = flags.DEFINE_bool("include_seen", False,
                                  "Allow items of the history among the recommendations.")
_SHOW_HISTORY = flags.DEFINE_bool("show_history", False, "Print each input history too.")


def read_histories(path: str) -> tuple[list[tuple[str, list[int]]], list[str]]:
  """``([(where, original ids)] per good non-empty line, [problems])`` of ``path``.

  Raises:
    ValueError: if the file holds no history at all.
  """
  histories, problems = [], []
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      fields = [field for field in re.split(r"[,\s]+", line.strip()) if field]
      if not fields:
        continue
      where = f"{path}, line {line_number}"
      try:
        histories.append((where, [int(field) for field in fields]))
      except ValueError:
        problems.append(f"{where}: expected integer item ids, got {line.strip()[:80]!r}")
  if not histories and not problems:
    raise ValueError(f"{path}: no history in the file (every line is empty); expected one "
                     "history per line, item ids separated by commas or spaces.")
  return histories, problems


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  user = _USER.value
  if _HISTORIES_FILE.value and (_HISTORY.value or user is not None):
    raise app.UsageError("--histories_file cannot be combined with --history or --user.")
  if not (_HISTORY.value or _HISTORIES_FILE.value or user is not None):
    raise app.UsageError("give --history, --histories_file or --user.")
  raw, problems = [], []
  if _HISTORY.value:
    try:
      raw = [("--history", [int(item) for item in _HISTORY.value])]
    except ValueError as e:
      raise app.UsageError(f"--history: expected integer item ids, got {_HISTORY.value}") from e
  elif _HISTORIES_FILE.value:
    raw, problems = read_histories(_HISTORIES_FILE.value)
  trainer, params, _ = train.load_trained(_WORKDIR.value)
  dataset = trainer.dataset
  users = None
  if user is not None:
    users = [recommend.encode_user(user, dataset.user_ids)]
    if not raw:
      history = recommend.user_history(dataset, users[0])
      raw = [("--user", [int(dataset.item_ids[i]) for i in history])]
  answered, histories = [], []
  for where, items in raw:
    try:
      histories.append(recommend.encode_history(items, dataset.item_ids, where))
      answered.append(items)
    except ValueError as error:
      if len(raw) == 1:
        raise
      problems.append(str(error))
  for problem in problems:
    print(f"skipped: {problem}", file=sys.stderr)
  if not histories:
    raise ValueError(f"no history could be answered ({len(problems)} skipped).")
  results = recommend.recommend(trainer, params, histories, top_k=_TOP_K.value,
                                exclude_seen=not _INCLUDE_SEEN.value, users=users)
  for items, top in zip(answered, results, strict=True):
    line = {"user": user} if user is not None else {}
    if _SHOW_HISTORY.value:
      line["history"] = items
    line["recommendations"] = [{"item": i, "score": round(s, 6)} for i, s in top]
    print(json.dumps(line))


if __name__ == "__main__":
  cli.run(main)
