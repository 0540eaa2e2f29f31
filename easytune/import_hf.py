"""Convert a Hugging Face model (directory or hub id) into an easytune checkpoint.

    python -m easytune.import_hf --model=path/or/hub_id --output_dir=ckpt [--param_dtype=bfloat16]

Weights stream from the memory-mapped safetensors into their shards (`--mesh_dim`), so host memory
holds about one copy of the model, never two.
"""
from __future__ import annotations

import argparse
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF directory or hub id")
    parser.add_argument("--output_dir", required=True, help="where the easytune checkpoint goes")
    parser.add_argument("--param_dtype", default=None, help="stored dtype (default: the checkpoint's)")
    parser.add_argument("--mesh_dim", default="1,-1,1", help="dp,fsdp,mp (one may be -1)")
    args = parser.parse_args(argv)

    import easytune
    start = time.time()
    model = easytune.load(args.model, param_dtype=args.param_dtype, mesh_dim=args.mesh_dim)
    model.save(args.output_dir)
    print(f"imported {args.model} -> {args.output_dir} ({model.config.model_type}, "
          f"{model.config.param_dtype}) in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
