"""Peak host memory of HF -> easytune -> HF conversion, as a multiple of the model's size.

Each stage runs in a fresh process; the same stage on a tiny model is the baseline (JAX runtime,
libraries, compilation), so `(peak - baseline) / model bytes` is what the weights cost. A
conversion that held the model twice (a full state dict plus the converted copy) would show >= 2.

    python scripts/conversion_memory.py [--layers 4] [--hidden 1024]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

STAGE = r"""
import resource, sys
from easytune import export_hf, import_hf
module = {"import": import_hf, "export": export_hf}[sys.argv[1]]
module.main(sys.argv[2:])
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_model(directory: str, layers: int, hidden: int, vocab: int) -> int:
    """Save a random LLaMA to `directory`; return its weight bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 256))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(directory)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def peak_kb(stage: str, args: list[str]) -> int:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", STAGE, stage, *args], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return int(out.stdout.split("PEAK_KB")[-1])


def measure(workdir: str, layers: int, hidden: int, vocab: int = 32000) -> dict:
    results = {}
    for name, (l, h, v) in {"tiny": (1, 64, 256), "model": (layers, hidden, vocab)}.items():
        src, ckpt, out = (os.path.join(workdir, f"{name}_{s}") for s in ("hf", "ckpt", "out"))
        size = make_model(src, l, h, v)
        results[name] = {
            "bytes": size,
            "import_kb": peak_kb("import", ["--model", src, "--output_dir", ckpt]),
            "export_kb": peak_kb("export", ["--checkpoint", ckpt, "--output_dir", out]),
        }
    size = results["model"]["bytes"]
    for stage in ("import", "export"):
        delta = (results["model"][f"{stage}_kb"] - results["tiny"][f"{stage}_kb"]) * 1024
        results[f"{stage}_ratio"] = delta / size
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        r = measure(workdir, args.layers, args.hidden)
    mb = r["model"]["bytes"] / 2**20
    print(f"model weights: {mb:.0f} MiB (float32)")
    for stage in ("import", "export"):
        print(f"{stage:>6}: peak RSS {r['model'][stage + '_kb'] / 1024:.0f} MiB, baseline "
              f"{r['tiny'][stage + '_kb'] / 1024:.0f} MiB -> weights cost {r[stage + '_ratio']:.2f}x the model size")
    print(json.dumps({k: v for k, v in r.items() if k.endswith("ratio")}))


if __name__ == "__main__":
    main()
