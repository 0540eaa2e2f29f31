"""KTO: the loss against TRL's own `KTOTrainer._compute_loss` (trl 1.16) on identical tensors and
from a tiny transformers model's log-probs, the data layouts (unpairing, KL companions) and their
errors, and train_kto end to end."""
import collections
import json
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import logged, run_config

import easytune
from easytune import data
from easytune.algos import kto
from easytune.data import unpaired
from easytune.train_kto import DEFAULTS, run


def make_cfg(model, train_data, output_dir, **overrides):
    return run_config(DEFAULTS, {"model": model, "train_data": train_data, "output_dir": str(output_dir),
                                 "logger": "none", "seq_length": 128, "batch_size": 8, "total_steps": 1,
                                 "log_steps": 1, "peft": "none", "optimizer.lr": 1e-3, **overrides})


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


@pytest.fixture(scope="module")
def example_file(tmp_path_factory):
    """8 unpaired examples (4 desirable, 4 undesirable) in text and message layouts."""
    records = []
    for n, r in enumerate(data.task_pairs(data.make_task_records(6, seed=3), seed=0)):
        label = n % 2 == 0
        records.append({"prompt": r["prompt"], "completion": r["chosen"] if label else r["rejected"], "label": label})
    records.append({"prompt": [{"role": "user", "content": "Name a colour."}],
                    "completion": [{"role": "assistant", "content": "Blue."}], "label": True})
    records.append({"prompt": "What is 3 + 4?", "completion": "3 + 4 is 8, I believe.", "label": False})
    return write_jsonl(tmp_path_factory.mktemp("kto") / "examples.jsonl", records)


# ----------------------------------------------------------------------------- TRL parity on identical tensors

class _Accelerator:
    device = "cpu"

    def gather_for_metrics(self, x):
        return x


def trl_kto(loss_type, beta, desirable_weight, undesirable_weight, inputs, model, ref_model=None):
    """TRL's KTOTrainer._compute_loss (trl/trainer/kto_trainer.py, unbound, with a stand-in self):
    `(loss tensor, TRL's logged metrics)`; reference log-probs from `inputs` (ref_logps,
    ref_KL_logps) when ref_model is None."""
    from trl.trainer.kto_trainer import KTOTrainer
    stand_in = types.SimpleNamespace(
        model=model, ref_model=ref_model, accelerator=_Accelerator(), aux_loss_enabled=False,
        precompute_ref_logps=ref_model is None, calculate_KL=loss_type == "kto", loss_type=loss_type, beta=beta,
        desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, args=types.SimpleNamespace(gradient_checkpointing_kwargs=None))
    stand_in._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(stand_in, m, b)
    loss = KTOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)
    return loss, stand_in._metrics["train" if model.training else "eval"]


def trl_on_sums(loss_type, beta, weights, policy, reference, policy_kl, reference_kl, labels):
    """TRL's loss on given summed log-probs `[batch]`: a stand-in model whose one "completion
    token" has the row's log-prob (rows 0..n-1 the examples, n..2n-1 their KL companions).
    Returns (loss, d loss / d policy, metrics)."""
    import torch
    n = len(policy)
    leaf = torch.tensor(policy, requires_grad=True)
    kl_table = torch.tensor(policy_kl)

    class Model:  # the fused LM head's outputs: [batch, seq - 1] with seq = 2
        training = True

        def __call__(self, input_ids, **kwargs):
            row = input_ids[:, 0]
            values = torch.where(row < n, leaf[row.clamp(max=n - 1)], kl_table[(row - n).clamp(min=0)])
            zeros = torch.zeros(len(row), 1)
            return types.SimpleNamespace(log_probs=values[:, None], entropy=zeros, mean_logits=zeros)

    ids = torch.arange(n)[:, None].repeat(1, 2)
    ones = torch.ones(n, 2, dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": ones, "completion_mask": ones, "KL_input_ids": ids + n,
              "KL_attention_mask": ones, "KL_completion_mask": ones, "label": torch.tensor(labels),
              "ref_logps": torch.tensor(reference), "ref_KL_logps": torch.tensor(reference_kl)}
    loss, metrics = trl_kto(loss_type, beta, *weights, inputs, Model())
    loss.backward()
    return loss.item(), leaf.grad.numpy(), metrics


CASES = {
    "kto": ("kto", 0.1, (1.0, 1.0), [True, False, True, True, False, False]),
    "kto_weights_beta": ("kto", 0.5, (1.33, 0.7), [True, False, False, True, False, False]),
    "kto_only_desirable": ("kto", 0.2, (1.0, 1.0), [True] * 5),
    "kto_only_undesirable": ("kto", 0.2, (1.0, 2.0), [False] * 5),
    "kto_negative_kl": ("kto", 0.1, (1.0, 1.0), [True, False, True, False]),  # z clamped at 0
    "apo_zero_unpaired": ("apo_zero_unpaired", 0.3, (1.0, 1.5), [True, False, True, False, False]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_rewards_and_kl_match_trl_on_identical_tensors(case):
    loss_type, beta, weights, labels = CASES[case]
    rng = np.random.RandomState(len(case))
    n = len(labels)
    policy = -rng.uniform(5.0, 30.0, n).astype(np.float32)
    reference = policy + rng.normal(0, 4.0, n).astype(np.float32)
    policy_kl = -rng.uniform(10.0, 40.0, n).astype(np.float32)
    shift = -3.0 if case == "kto_negative_kl" else 2.0  # the KL estimate's sign
    reference_kl = policy_kl - shift + rng.normal(0, 1.0, n).astype(np.float32)
    theirs, their_grad, metrics = trl_on_sums(loss_type, beta, weights, policy, reference, policy_kl, reference_kl,
                                              labels)

    options = kto.KTOConfig(loss_type, beta, *weights)
    valid = jnp.ones(n, bool)
    label_array = jnp.asarray(labels)

    def mean_loss(policy_logps):
        kl = kto.kl_estimate(jnp.asarray(policy_kl), jnp.asarray(reference_kl), valid) if options.uses_kl else 0.0
        losses, rewards = kto.kto_losses(options, policy_logps, jnp.asarray(reference), label_array, kl)
        return jnp.mean(losses), (rewards, kl)

    (ours, (rewards, kl)), grad = jax.value_and_grad(mean_loss, has_aux=True)(jnp.asarray(policy))
    print(f"\n{case}: ours {float(ours):.8f}, TRL {theirs:.8f}, kl {float(kl):.6f} / {metrics['kl'][0]:.6f}")
    tolerance = dict(rtol=1e-6, atol=2e-7)  # float32 sigmoids of O(1) arguments
    np.testing.assert_allclose(float(ours), theirs, **tolerance)
    np.testing.assert_allclose(np.asarray(grad), their_grad, **tolerance)
    np.testing.assert_allclose(float(kl), metrics["kl"][0], rtol=1e-6, atol=1e-6)
    if case == "kto_negative_kl":
        assert metrics["kl"][0] == 0.0 == float(kl)
    elif loss_type == "kto":
        assert float(kl) > 0.5
    rewards = np.asarray(rewards)
    for side, mask in (("chosen", np.array(labels)), ("rejected", ~np.array(labels))):
        if mask.any():
            np.testing.assert_allclose(rewards[mask].mean(), metrics[f"rewards/{side}"][0], rtol=1e-6, atol=1e-6)
        else:
            assert f"rewards/{side}" not in metrics


def test_kl_is_a_baseline_without_gradient():
    """z enters the loss detached: the gradient wrt the KL companions' log-probs is 0 (TRL runs
    them under no_grad and detaches the mean)."""
    options = kto.KTOConfig()
    valid, labels = jnp.ones(4, bool), jnp.array([True, False, True, False])
    policy, reference = jnp.array([-3.0, -4.0, -5.0, -6.0]), jnp.array([-4.0, -3.0, -5.5, -5.0])

    def loss_of_kl(policy_kl):
        kl = kto.kl_estimate(policy_kl, jnp.full(4, -10.0), valid)
        return jnp.mean(kto.kto_losses(options, policy, reference, labels, kl)[0])

    assert np.all(np.asarray(jax.grad(loss_of_kl)(jnp.full(4, -8.0))) == 0)
    assert loss_of_kl(jnp.full(4, -8.0)) != loss_of_kl(jnp.full(4, -9.0))  # but it does shift the loss


# ----------------------------------------------------------------------------- from model log-probs

def trl_inputs(rows, pad_token_id):
    """Our KTO rows -> TRL's KTO batch: right-padded, the completion mask on the completion tokens
    themselves (our loss_mask is on the predicting token), for the examples and KL_* companions."""
    import torch
    out = {}
    for prefix, theirs in (("", ""), ("kl_", "KL_")):
        attention = rows[f"{prefix}segment_ids"] > 0
        loss_mask = rows[f"{prefix}loss_mask"]
        completion = np.zeros_like(loss_mask)
        completion[:, 1:] = loss_mask[:, :-1]
        out[f"{theirs}input_ids"] = torch.tensor(np.where(attention, rows[f"{prefix}input_ids"], pad_token_id),
                                                 dtype=torch.long)
        out[f"{theirs}attention_mask"] = torch.tensor(attention, dtype=torch.long)
        out[f"{theirs}completion_mask"] = torch.tensor(completion, dtype=torch.long)
    out["label"] = torch.tensor(rows["label"][:, 0] > 0)
    return out


@pytest.fixture(scope="module")
def perturbed_chat_model(tiny_chat_model, tmp_path_factory):
    """tiny_chat_model with every weight moved a little: a reference that differs from the policy."""
    import torch
    from transformers import AutoModelForCausalLM
    directory = tmp_path_factory.mktemp("tiny_chat_perturbed")
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(str(directory))
    for name in os.listdir(tiny_chat_model):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(os.path.join(tiny_chat_model, name), directory)
    return str(directory)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_loss_from_model_logprobs_matches_trl_on_transformers(tiny_chat_model, perturbed_chat_model, example_file,
                                                               loss_type):
    """make_loss on our forward of a perturbed tiny model (policy) and the tiny model (reference) equals
    TRL's KTOTrainer._compute_loss on transformers' forwards of the same weights and tokens: loss,
    kl, rewards and log-probs per label."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head
    policy, reference = easytune.load(perturbed_chat_model), easytune.load(tiny_chat_model)
    tokenizer = policy.tokenizer
    records, locations = data.load_pairs(example_file)
    rows, stats = unpaired.unpaired_rows(records, tokenizer, tokenizer.chat_template, 128, 8, example_file, locations)
    assert (stats.num_desirable, stats.num_undesirable) == (4, 4)
    options = kto.KTOConfig(loss_type, beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    loss_sum, count, metrics = jax.jit(kto.make_loss(options).fn, static_argnums=0)(
        policy.config, policy.params, {k: jnp.asarray(v) for k, v in rows.items()}, reference.params)
    ours = kto.derive({"loss": float(loss_sum / count), **{k: float(v / count) for k, v in metrics.items()}})

    torch_policy = AutoModelForCausalLM.from_pretrained(perturbed_chat_model, dtype=torch.float32)
    add_fused_lm_head(torch_policy, outputs=("log_probs", "entropy", "mean_logits"))
    torch_reference = AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float32).eval()
    add_fused_lm_head(torch_reference)
    with torch.no_grad():
        theirs, their_metrics = trl_kto(loss_type, 0.5, 1.0, 1.5, trl_inputs(rows, tokenizer.pad_token_id),
                                        torch_policy, torch_reference)
    print(f"\n{loss_type}: ours {ours['loss']:.7f}, transformers + TRL {theirs.item():.7f}; kl {ours['kl']:.5f} / "
          f"{their_metrics['kl'][0]:.5f}; rewards/chosen {ours['rewards/chosen']:.5f}")
    np.testing.assert_allclose(ours["loss"], theirs.item(), rtol=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl"):
        np.testing.assert_allclose(ours[key], their_metrics[key][0], rtol=2e-5, atol=2e-5, err_msg=key)
    if loss_type == "kto":
        assert ours["kl"] > 0.01  # the perturbation makes the KL term carry weight (not clamped to 0)


# ----------------------------------------------------------------------------- data

@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model):
    return easytune.load(tiny_chat_model).tokenizer


def test_pairs_are_unpaired_and_kl_companions_rotate_within_batches(tokenizer):
    """A pair gives a desirable and an undesirable example (chosen first per 1000 records, as TRL's
    unpair_preference_dataset); each row's KL companion is its own prompt with the completion of
    the example before it in its batch-sized chunk (TRL's add_kl_completion_ids)."""
    records = [{"prompt": f"Question {n}?", "chosen": f"Right {n}.", "rejected": f"Wrong {n}."} for n in range(3)]
    records.append({"prompt": "Q?", "completion": [{"role": "assistant", "content": "A."}], "label": False})
    examples, _ = unpaired.unpair(records, [f"line {n}" for n in range(1, 5)])
    assert [(e.completion[0]["content"], e.label) for e in examples] == [
        ("Right 0.", True), ("Right 1.", True), ("Right 2.", True), ("A.", False),
        ("Wrong 0.", False), ("Wrong 1.", False), ("Wrong 2.", False)]
    assert unpaired.kl_partners(7, 3).tolist() == [2, 0, 1, 5, 3, 4, 6]

    rows, stats = unpaired.unpaired_rows(records, tokenizer, tokenizer.chat_template, 128, 3, "pairs")
    assert stats.num_kept == 7 and rows["label"][:, 0].tolist() == [1, 1, 1, 0, 0, 0, 0]

    def text(prefix, row, masked):
        ids = rows[f"{prefix}input_ids"][row]
        keep = rows[f"{prefix}segment_ids"][row] > 0
        if masked:  # the trained targets: the tokens after each loss_mask position
            keep = np.concatenate([[False], rows[f"{prefix}loss_mask"][row][:-1] > 0])
        return tokenizer.decode(ids[keep])

    for row, partner in enumerate(unpaired.kl_partners(7, 3)):
        assert text("kl_", row, masked=True) == text("", partner, masked=True)  # the partner's completion
        assert text("kl_", row, masked=False).startswith(text("", row, masked=False).split("<|im_start|>assistant")[0])
    assert "Question 1?" in text("kl_", 1, False) and "Right 0." in text("kl_", 1, False)


@pytest.mark.parametrize("records, message", [
    ([{"prompt": "Hi", "completion": "a", "label": True}, {"prompt": "Hi", "completion": "b"}],
     r"examples.jsonl line 3: missing 'label'"),
    ([{"prompt": "Hi", "completion": "a", "label": "yes"}], r"examples.jsonl line 1: 'label' must be true"),
    ([{"prompt": "Hi", "completion": "a", "label": 1}], r"examples.jsonl line 1: 'label' must be true"),
    ([{"prompt": "Hi", "label": False}], r"examples.jsonl line 1: missing 'completion'"),
    ([{"prompt": "Hi", "completion": [{"role": "user", "content": "x"}], "label": True}],
     r"line 1: 'completion' must hold assistant turns only"),
    ([{"prompt": "Hi", "chosen": "a"}], r"examples.jsonl line 1: missing 'rejected'"),
])
def test_bad_records_name_file_and_line(tiny_chat_model, tmp_path, records, message):
    path = tmp_path / "examples.jsonl"
    with open(path, "w") as f:  # a blank line: errors still name the file's own line numbers
        f.write(json.dumps(records[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in records[1:]))
    with pytest.raises(ValueError, match=message):
        run(make_cfg(tiny_chat_model, str(path), tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")


def test_bad_options_are_clear_errors(tiny_chat_model, example_file, tmp_path):
    with pytest.raises(ValueError, match="unknown --loss_type 'sigmoid'"):
        run(make_cfg(tiny_chat_model, example_file, tmp_path / "a", loss_type="sigmoid"))
    with pytest.raises(ValueError, match="the kto loss needs more than one example per micro-batch"):
        run(make_cfg(tiny_chat_model, example_file, tmp_path / "b", batch_size=2, grad_accum_steps=2))


# ----------------------------------------------------------------------------- end to end

def test_train_kto_end_to_end_loss_falls_with_trl_figures(tiny_chat_model, example_file, tmp_path):
    """A few steps of train_kto (all weights, a reference copy, eval on the training file): the
    loss falls, desirable rewards rise above undesirable ones, and the log and summary carry
    TRL's figures (rewards/chosen, rewards/rejected, rewards/margins, logps/*, kl)."""
    out = tmp_path / "run"
    summary = run(make_cfg(tiny_chat_model, example_file, out, total_steps=6, eval_data=example_file,
                           **{"optimizer.warmup_ratio": 0.0}))
    records = logged(out)
    figures = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl")
    assert all(key in records[0] for key in figures) and not any(k.endswith("_sum") for k in records[0])
    assert summary["reference"] == "copy" and summary["train_desirable"] == 4 and summary["train_undesirable"] == 4
    # step 1: policy == reference, so every reward and the KL are 0 and the loss is the mean weight / 2
    assert records[0]["loss"] == pytest.approx(0.5, abs=1e-6) and records[0]["kl"] == 0.0
    assert records[-1]["loss"] < records[0]["loss"] - 0.02
    assert summary["rewards/margins"] > 0 and summary["eval_rewards/margins"] > 0
    assert all(f"eval_{key}" in summary for key in figures)
    with open(out / "summary.json") as f:
        assert json.load(f)["last_loss"] == records[-1]["loss"]


def test_precomputed_reference_and_lora_reference(tiny_chat_model, example_file, tmp_path):
    """--precompute_reference trains exactly as the reference copy; with LoRA the reference is the
    base with the adapter off (B = 0 at step 1: the loss is 0.5)."""
    results = {}
    for mode in ("copy", "precomputed"):
        summary = run(make_cfg(tiny_chat_model, example_file, tmp_path / mode, total_steps=2, batch_size=4,
                               mesh_dim="2,2,2",
                               precompute_reference=mode == "precomputed"))
        results[mode] = (summary, logged(tmp_path / mode))
    (copy, copy_log), (pre, pre_log) = results["copy"], results["precomputed"]
    assert pre["reference"] == "precomputed" and pre["train_state_bytes"]["frozen"] == 0
    assert copy["reference"] == "copy" and copy["train_state_bytes"]["frozen"] > 0
    assert os.path.exists(tmp_path / "precomputed" / "reference_logps_train.npz")
    for key in ("loss", "kl", "rewards/chosen", "logps/chosen"):
        np.testing.assert_allclose([r.get(key, 0) for r in pre_log], [r.get(key, 0) for r in copy_log],
                                   rtol=1e-5, atol=1e-6)
    assert copy_log[-1]["kl"] != 0 or copy_log[-1]["rewards/chosen"] != 0  # step 2 moved the policy

    summary = run(make_cfg(tiny_chat_model, example_file, tmp_path / "lora", peft="lora", **{"lora.rank": 4}))
    assert summary["reference"] == "base (adapter off)"
    assert logged(tmp_path / "lora")[0]["loss"] == pytest.approx(0.5, abs=1e-6)
