"""PEFT through `train_sft`: only adapter parameters train (and carry optimizer state), the base
stays bit-identical, sharding does not change the result, and exports load in transformers/peft."""
import json

import jax
import numpy as np
import pytest

import easytune
from easytune import adapters
from easytune.train_sft import run

from test_train_sft import logged, make_cfg

TOKENS = np.random.RandomState(0).randint(0, 49152, (2, 16))


def host_tree(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def test_lora_starts_at_base_trains_only_adapter_and_exports(tiny_chat_model, task_file, tmp_path):
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    base = easytune.load(tiny_chat_model, tokenizer=False)
    base_logits = np.asarray(base(TOKENS))
    base_params = host_tree(base.params)
    # step 0: B is zero, so the adapted model is the base (to float rounding: the compiled graph
    # differs); A is random, so a non-zero B would show at 1e-2
    fresh = easytune.load(tiny_chat_model, tokenizer=False)
    fresh.add_adapter("lora", rank=4, alpha=8)
    assert all(not np.asarray(node).any() for node in jax.tree.leaves(fresh.adapter.params)
               if node.shape[-2] == 4)  # every lora_b [.., r, out]
    np.testing.assert_allclose(np.asarray(fresh(TOKENS)), base_logits, rtol=0, atol=1e-6)

    out = tmp_path / "run"
    cfg = make_cfg(tiny_chat_model, task_file, out, peft="lora", total_steps=4, mesh_dim="2,2,2",
                   export_hf=str(tmp_path / "merged"), export_peft=str(tmp_path / "adapter"),
                   **{"lora.rank": 4, "lora.alpha": 8.0, "lora.dropout": 0.1, "lora.target_modules": "q_proj,v_proj,down_proj"})
    summary = run(cfg)
    records = logged(out)
    assert records[-1]["loss"] < records[0]["loss"]
    with open(tmp_path / "adapter" / "adapter_config.json") as f:  # the base as the user named it
        assert json.load(f)["base_model_name_or_path"] == tiny_chat_model
    # LoRA on q, v, down of 2 layers: r * (in + out) each
    assert summary["trainable_params"] == 2 * 4 * ((64 + 64) + (64 + 32) + (128 + 64))

    trained = easytune.load(str(out), tokenizer=False)  # the run directory: base + trained adapter
    assert trained.adapter is not None and trained.adapter.config.modules == (
        "layers/attn/q", "layers/attn/v", "layers/mlp/down")
    # the base is bit-identical after training; only the adapter moved
    jax.tree.map(np.testing.assert_array_equal, host_tree(trained.params), base_params)
    assert np.abs(np.asarray(trained.adapter.params["layers"]["attn"]["q"]["lora_b"])).max() > 0
    logits = np.asarray(trained(TOKENS))
    assert np.abs(logits - base_logits).max() > 1e-4

    # only adapter parameters carry optimizer state: AdamW's two moments per adapter leaf
    from easytune import train
    from easytune.recipe import Loss
    from easytune.run import attach_adapter
    trainer_cfg = make_cfg(tiny_chat_model, task_file, tmp_path / "probe", peft="lora")
    probe = easytune.load(tiny_chat_model, tokenizer=False)
    attach_adapter(probe, trainer_cfg)
    trainer = train.Trainer(train.TrainConfig.from_flags(trainer_cfg), probe, Loss(lambda c, p, b: (0.0, 1.0)),
                            total_steps=1)
    moments = [x for x in jax.tree.leaves(trainer.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * adapters.count(probe.adapter.params)

    # the export CLI merges an adapter run too, to the same tensors, and writes its peft adapter
    from easytune import export_hf
    from safetensors.numpy import load_file
    export_hf.main(["--checkpoint", str(out), "--output_dir", str(tmp_path / "cli"),
                    "--peft_output_dir", str(tmp_path / "cli_adapter")])
    # (merged on another mesh: the fp32 merge matmul may round differently, so not bit-equal)
    a, b = load_file(str(tmp_path / "cli" / "model.safetensors")), load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6)
    a = load_file(str(tmp_path / "cli_adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    # merged HF export and peft adapter both reproduce the trained model in transformers
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
        np.testing.assert_allclose(merged(torch.tensor(TOKENS)).logits.numpy(), logits, atol=1e-4)
        hf_base = AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float32)
        with_adapter = peft.PeftModel.from_pretrained(hf_base, str(tmp_path / "adapter")).eval()
        np.testing.assert_allclose(with_adapter(torch.tensor(TOKENS)).logits.numpy(), logits, atol=1e-4)


def test_sharded_lora_training_matches_unsharded(tiny_chat_model, task_file, tmp_path):
    """DoRA with dropout: weights and adapters sharded over fsdp/mp give the losses and adapter
    of a run whose parameters are not sharded (8,1,1 replicates them)."""
    results = {}
    for mesh in ("8,1,1", "1,2,4"):
        cfg = make_cfg(tiny_chat_model, task_file, tmp_path / mesh, peft="dora", total_steps=2, mesh_dim=mesh,
                       **{"lora.rank": 4, "lora.dropout": 0.1})
        run(cfg)
        model = easytune.load(str(tmp_path / mesh), tokenizer=False, mesh_dim=mesh)
        if mesh == "1,2,4":
            spec = model.adapter.params["layers"]["mlp"]["down"]["lora_a"].sharding.spec
            assert spec == jax.sharding.PartitionSpec(None, "mp", None)  # down's input dim is mp-sharded
        results[mesh] = ([r["loss"] for r in logged(tmp_path / mesh)], host_tree(model.adapter.params))
    losses, params = results["8,1,1"]
    for mesh in ("1,2,4",):
        np.testing.assert_allclose(results[mesh][0], losses, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), results[mesh][1], params)


def test_qlora_trains_adapter_over_frozen_nf4_base(tiny_chat_model, task_file, tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(tiny_chat_model, task_file, out, peft="qlora", total_steps=4, save_steps=2,
                   export_peft=str(tmp_path / "adapter"), **{"lora.rank": 4})
    run(cfg)
    records = logged(out)
    assert records[-1]["loss"] < records[0]["loss"]
    trained = easytune.load(str(out), tokenizer=False)
    assert trained.adapter.config.method == "qlora"
    down = trained.params["layers"]["mlp"]["down"]
    assert "kernel" not in down and down["nf4_codes"].dtype == np.uint8
    # resuming the adapter run continues from its step; the NF4 base is re-made from the same weights
    first = easytune.load(str(out / "checkpoints" / "2"), tokenizer=False)
    reference = easytune.load(tiny_chat_model, tokenizer=False)
    reference.add_adapter("qlora", rank=4)
    jax.tree.map(np.testing.assert_array_equal, host_tree(first.params), host_tree(reference.params))
    # the exported adapter continues training with --peft_adapter
    cfg2 = make_cfg(tiny_chat_model, task_file, tmp_path / "continued", peft="qlora",
                    peft_adapter=str(tmp_path / "adapter"), total_steps=1)
    run(cfg2)
    assert logged(tmp_path / "continued")[0]["loss"] < records[0]["loss"]


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_learning_trains_through_train_sft(tiny_chat_model, task_file, tmp_path, method):
    import peft
    import torch
    from transformers import AutoModelForCausalLM
    out = tmp_path / "run"
    cfg = make_cfg(tiny_chat_model, task_file, out, peft=method, total_steps=4, export_peft=str(tmp_path / "adapter"),
                   **{"prompt.num_virtual_tokens": 4, "optimizer.lr": 1e-2})
    summary = run(cfg)
    records = logged(out)
    assert records[-1]["loss"] < records[0]["loss"]
    assert summary["trainable_params"] < 10_000
    trained = easytune.load(str(out), tokenizer=False)
    logits = np.asarray(trained(TOKENS))
    with torch.no_grad():
        hf_base = AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float32)
        theirs = peft.PeftModel.from_pretrained(hf_base, str(tmp_path / "adapter")).eval()(
            torch.tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(theirs if method == "prefix" else theirs[:, 4:], logits, atol=1e-4)
    with pytest.raises(ValueError, match="cannot be; use --export_peft"):
        run(make_cfg(tiny_chat_model, task_file, tmp_path / "x", peft=method, export_hf=str(tmp_path / "hf")))


def test_bench_peft_script_reports_memory_and_kl(tiny_chat_model, tmp_path):
    """scripts/bench_peft.py at a tiny size: every method trains, adapters need a fraction of full
    fine-tuning's train state, NF4 block kernels are <= 0.3x their bf16 size, and the KL is small."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench_peft.py")
    spec = importlib.util.spec_from_file_location("bench_peft", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--model", tiny_chat_model, "--batch", "2", "--seq", "16", "--steps", "1", "--rank", "4",
                          "--methods", "full,qlora"])
    assert results["qlora"]["trainable_params"] < results["full"]["trainable_params"] / 100
    # AdamW's two moments of the adapter, plus step counters
    assert 0 <= results["qlora"]["optimizer_bytes"] - 2 * results["qlora"]["trained_bytes"] < 64
    assert results["qlora"]["block_linear_bytes_vs_bf16"] <= 0.3
    assert results["qlora"]["train_state_bytes"] < results["full"]["train_state_bytes"] / 2
    assert 0 < results["nf4_kl"]["kl_mean"] < 0.05 and results["nf4_kl"]["top1_agreement"] > 0.9


def test_lora_two_processes_and_resume_match_one_uninterrupted_run(tiny_chat_model, task_file, tmp_path):
    """A QLoRA run over 2 real processes (jax.distributed, mesh 1,2,1 across them) and a run stopped
    at step 2 then resumed both give the losses of one uninterrupted single-process run, and the
    multi-process adapter export equals the single-process one."""
    import shutil

    from conftest import run_processes
    from safetensors.numpy import load_file
    from test_train_resume import ENV, losses, run_to_end, train_command
    flags = ("--peft=qlora", "--lora.rank=4", "--lora.dropout=0.1", "--mesh_dim=1,2,1", "--seq_length=64")
    one = tmp_path / "one"
    run_to_end(train_command(tiny_chat_model, task_file, one, "--total_steps=4", *flags,
                             f"--export_peft={one}/adapter"))
    reference = losses(one)

    # as if killed after the step-2 checkpoint: resuming redoes steps 3 and 4 exactly
    resumed = tmp_path / "resumed"
    shutil.copytree(one, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    run_to_end(train_command(tiny_chat_model, task_file, resumed, "--total_steps=4", "--resume", *flags))
    assert losses(resumed) == reference  # same data order, adapter, optimizer state and dropout keys

    two = tmp_path / "two"
    env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    run_processes(lambda address: [train_command(tiny_chat_model, task_file, two, "--total_steps=4", *flags,
                                                 f"--export_peft={two}/adapter",
                                                 f"--jax_distributed.coordinator_address={address}",
                                                 "--jax_distributed.num_processes=2",
                                                 f"--jax_distributed.process_id={i}") for i in range(2)],
                  env, timeout=600, output_dir=tmp_path)
    for step, loss in losses(two).items():
        assert abs(loss - reference[step]) <= 1e-5 * abs(reference[step])
    ours, theirs = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (two, one))
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-4, atol=1e-6)
