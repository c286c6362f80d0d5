"""deeprec_jax: deep sequential recommenders in JAX/Flax linen."""

import setuptools

# Ranges are the versions tested on this project's CPU machines (jax 0.10.2,
# flax 0.12.8, optax 0.2.8, orbax-checkpoint 0.12.8, tfds 4.9.10, grain 0.2.18).
INSTALL_REQUIRES = [
    "jax>=0.10,<0.11",
    "jaxlib>=0.10,<0.11",
    "flax>=0.12,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.12,<0.13",
    # TFDS without TensorFlow: array_record files read back via data_source.
    "tensorflow-datasets>=4.9.9,<4.10",
    "array-record>=0.8,<0.9",
    "importlib_resources>=6",  # imported by TFDS on Python 3.11
    "grain>=0.2.12,<0.3",
    "absl-py>=2.1,<3",
    "ml-collections>=1.0,<2",
    "numpy>=2.0,<3",
    "tensorboardX>=2.6,<3",  # TensorBoard event files without TensorFlow
    "matplotlib>=3.8,<4",  # ablation plots
    "tqdm>=4.66,<5",  # the training progress bar
    "flatbuffers>=24,<26",  # jax.export serialization (serving artifacts)
    # DP-SGD accounting (privacy.py); tested with dp-accounting 0.6.0 and scipy 1.17.1.
    "dp-accounting>=0.6,<0.7",
    "scipy>=1.10,<2",  # privacy.py: the Poisson batch cap (a binomial tail)
]

# Sweep executors and the search (experiments.ablate --executor, experiments.search);
# tested with submitit 1.5.4, ray 2.60.0, optuna 5.0.0 (SQLAlchemy 2.1).
SWEEPS = ["submitit>=1.5.4,<1.6", "ray>=2.60,<2.61", "optuna>=5.0,<5.1"]

EXTRAS_REQUIRE = {
    # Tested with pytest 9.2.0 and pytest-xdist 3.8.0 (pytest.ini runs 2 workers).
    "test": ["pytest>=8,<10", "pytest-xdist>=3.6,<4", "hypothesis>=6.100,<7", "ruff>=0.6",
             *SWEEPS],
    "sweeps": SWEEPS,
    "bench": [],  # the benchmarks need nothing beyond the runtime set
}

setuptools.setup(
    name="deeprec_jax",
    version="0.1.0",
    description="Deep sequential recommenders (Caser, RNN, SASRec, BERT4Rec) in JAX.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["deeprec_jax*", "experiments*", "benchmarks*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
