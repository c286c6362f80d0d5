"""Serving: a portable inference artifact and its loader (``jax`` + numpy only).

``load(directory).recommend(histories, k)`` answers in original item ids.
``exporter`` writes artifacts (it needs the training code); ``server`` is the
HTTP endpoint with micro-batching (``experiments.serve``). See docs/serving.md.
"""

from deeprec_jax.serving.artifact import Artifact, Row, UnknownIdError, load

__all__ = ["Artifact", "Row", "UnknownIdError", "load"]
