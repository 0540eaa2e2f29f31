"""Two real processes (jax.distributed on 127.0.0.1, gloo CPU collectives), 4 devices each: the
mesh spans both, each process loads only its shards, and export from the pair is exact."""
import os
import sys

import numpy as np
import torch

from conftest import run_processes
from test_hf import assert_same_state_dict

CHILD = r"""
import os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
coordinator, process_id, model_dir, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator, num_processes=2, process_id=process_id)
import numpy as np
from jax.experimental import multihost_utils
import easytune

model = easytune.load(model_dir, tokenizer=False, mesh_dim="2,2,2")
assert jax.device_count() == 8 and jax.local_device_count() == 4
assert model.mesh.devices.size == 8
q = model.params["layers"]["attn"]["q"]["kernel"]
assert not q.is_fully_addressable and len(q.addressable_shards) == 4
tokens = np.random.RandomState(0).randint(0, 128, (8, 16))
logits = multihost_utils.process_allgather(model(tokens), tiled=True)
generated = model.generate([[1, 17, 33, 9], [1, 90]] * 4, max_new_tokens=6)
model.save_pretrained(out_dir)
if process_id == 0:
    np.save(os.path.join(out_dir, "logits.npy"), logits)
    np.save(os.path.join(out_dir, "generated.npy"), np.asarray(generated))
print("CHILD_OK", process_id)
"""


def test_two_process_load_forward_and_export(hf_models, tmp_path):
    from transformers import AutoModelForCausalLM
    directory, torch_model = hf_models["llama3_gqa_rope_scaling"]
    out = str(tmp_path / "out")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    outputs = run_processes(lambda address: [[sys.executable, "-c", CHILD, address, str(i), directory, out]
                                             for i in range(2)], env, timeout=300, output_dir=tmp_path)
    for i, text in enumerate(outputs):
        assert f"CHILD_OK {i}" in text, text[-3000:]

    tokens = np.random.RandomState(0).randint(0, 128, (8, 16))
    with torch.no_grad():
        ref = torch_model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.load(os.path.join(out, "logits.npy")), ref, atol=1e-4)
    for prompt, tokens in zip([[1, 17, 33, 9], [1, 90]] * 4, np.load(os.path.join(out, "generated.npy")).tolist()):
        with torch.no_grad():
            expected = torch_model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                            eos_token_id=2, pad_token_id=0)[0, len(prompt):].tolist()
        assert tokens == expected
    assert_same_state_dict(torch_model, AutoModelForCausalLM.from_pretrained(out))
