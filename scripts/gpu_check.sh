#!/usr/bin/env bash
# Everything a lent GPU should check, in one call (the device time is short and each start costs
# minutes): versions; the Pallas kernel against the XLA reference on the real device; the attention
# benchmark (easytune's kernel, cuDNN, XLA, JAX's Pallas mha; a ~1B train step with each); the SFT
# step next to transformers + PyTorch on the same GPU (fp32 and bf16 mixed precision); and an SFT
# run through the CLI (bf16, the pallas kernel, a checkpoint, resume, HF export).
# The device image lacks some of easytune's pure-Python dependencies: carry them as wheels in .whl/
# (ml_collections, tensorboardX, gguf, datasets, dill, multiprocess) and install them to a --target first.
#
#     bash scripts/gpu_check.sh            # logs in $OUT (the device tool's folder) or ./gpu_check_out
#     ONLY=env,sft_cli JAX_PLATFORMS=cpu PY=python bash scripts/gpu_check.sh   # some stages (a dry run on CPU)
#
# Each stage is time-boxed, so one that hangs or fails leaves the others' figures.
out=${OUT:-gpu_check_out}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PY:-python3}

stage() {  # name seconds command...
  local name=$1 secs=$2; shift 2
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then return; fi
  echo "=== $name: start $(date -u +%T), limit ${secs}s"
  timeout "$secs" "$@" >"$out/$name.log" 2>&1
  echo "=== $name: rc=$? end $(date -u +%T)"
  grep -v -E "Writing model shards|Loading weights|it/s\]" "$out/$name.log" | tail -n "${TAIL:-25}"
}

stage env 60 bash -c "date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv;
  $PY -c 'import sys, jax, jaxlib, torch, transformers, optax, orbax.checkpoint as o;
print(sys.version.split()[0], \"jax\", jax.__version__, \"jaxlib\", jaxlib.__version__, \"torch\", torch.__version__,
      \"transformers\", transformers.__version__, \"optax\", optax.__version__, \"orbax\", o.__version__);
print(jax.devices())'"

# the real kernel (interpret=None picks Triton on a GPU) against the XLA reference; conftest sets
# highest matmul precision, so fp32 dots are IEEE on both sides
TAIL=12 stage kernel_tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py \
  -k "${KTESTS:-values_and_gradients or (scale_and_softcap and pallas) or other_head_dims or invalid_inputs or prefill}"

TAIL=45 stage attention 180 $PY scripts/bench_attention.py --seqs=${SEQS:-1024,4096,16384} --head_dims=64,128 \
  --repeats 5 --warmup 2

stage sft_cli 100 bash -c "set -e; $PY - <<'PY'
import json, random
from tests.conftest import make_char_chat_model
make_char_chat_model('/tmp/gpu_char', hidden_size=128, num_attention_heads=2, num_key_value_heads=1)  # head_dim 64
rng = random.Random(0)
with open('/tmp/gpu_sft.jsonl', 'w') as f:
    for _ in range(256):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        f.write(json.dumps({'messages': [{'role': 'user', 'content': f'{a}+{b}'},
                                         {'role': 'assistant', 'content': str(a + b)}]}) + '\n')
PY
common='--model=/tmp/gpu_char --train_data=/tmp/gpu_sft.jsonl --seq_length=64 --batch_size=16 --dtype=bfloat16
        --attention=pallas --mesh_dim=1,-1,1 --save_steps=10 --log_steps=5 --optimizer.lr=1e-3 --output_dir=/tmp/gpu_sft'
$PY -m easytune.train_sft \$common --total_steps=10
$PY -m easytune.train_sft \$common --total_steps=20 --resume --resume_override=total_steps --export_hf=/tmp/gpu_sft_hf
$PY -c \"import json; [print(l.strip()) for l in open('/tmp/gpu_sft/metrics.jsonl')]; print(json.load(open('/tmp/gpu_sft/summary.json')).get('run', {}).get('devices'))\"
ls /tmp/gpu_sft_hf"
stage train 160 bash -c "$PY scripts/bench_train.py --shape smollm2-135m --batch 8 --seq 512 --pairs 5 --dtype float32;
  $PY scripts/bench_train.py --shape smollm2-135m --batch 8 --seq 512 --pairs 5 --dtype bfloat16;
  $PY scripts/bench_train.py --shape llama3.2-1b --batch 4 --seq 2048 --pairs 5 --dtype bfloat16 --attention cudnn"

echo "=== done $(date -u +%T)"
