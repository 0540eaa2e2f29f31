"""Export an easytune checkpoint (or re-export an HF directory) as a Hugging Face directory.

    python -m easytune.export_hf --checkpoint=ckpt --output_dir=hf_out [--dtype=bfloat16]
    python -m easytune.export_hf --checkpoint=base --adapter=peft_dir --output_dir=merged

The result loads with `transformers.AutoModelForCausalLM.from_pretrained(hf_out)`. Tensors are
gathered and written one at a time. An adapter (of a PEFT training run, or a peft directory given
with --adapter) is merged into the weights; --peft_output_dir also writes it in peft's format.
"""
from __future__ import annotations

import argparse
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="easytune checkpoint or HF directory")
    parser.add_argument("--output_dir", required=True, help="the Hugging Face directory to write")
    parser.add_argument("--dtype", default=None, help="on-disk dtype (default: the parameters')")
    parser.add_argument("--max_shard_size", type=int, default=5 * 1024**3, help="bytes per safetensors file")
    parser.add_argument("--mesh_dim", default="1,-1,1", help="dp,fsdp,mp (one may be -1)")
    parser.add_argument("--adapter", default=None, help="a peft adapter directory to merge into the weights")
    parser.add_argument("--peft_output_dir", default=None, help="also write the adapter as a peft directory here")
    args = parser.parse_args(argv)

    import easytune
    start = time.time()
    model = easytune.load(args.checkpoint, mesh_dim=args.mesh_dim, adapter=args.adapter)
    if args.peft_output_dir:
        model.save_peft(args.peft_output_dir)
    model.save_pretrained(args.output_dir, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"exported {args.checkpoint} -> {args.output_dir} in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
