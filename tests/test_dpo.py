"""Preference optimization: losses and gradients against TRL's own code, the train_dpo entry point
end to end against transformers + TRL, the reference policy (copy, precomputed, adapter base),
and the preference data layouts and errors."""
import collections
import json
import math
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import logged, run_config

import easytune
from easytune import adapters, data, train
from easytune.algos import dpo
from easytune.data import preference
from easytune.run import attach_adapter
from easytune.train_dpo import DEFAULTS, DOCS, run

BETA = 0.1


def make_cfg(model, train_data, output_dir, **overrides):
    return run_config(DEFAULTS, {"model": model, "train_data": train_data, "output_dir": str(output_dir),
                                 "logger": "none", "seq_length": 128, "batch_size": 8, "total_steps": 1,
                                 "log_steps": 1, "peft": "none", "beta": BETA, "optimizer.lr": 1e-3, **overrides})


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    """8 pairs (one batch) in three layouts, of different lengths, one with a multi-turn prompt."""
    records = [{k: r[k] for k in ("prompt", "chosen", "rejected")}
               for r in data.task_pairs(data.make_task_records(6, seed=3), seed=0)]
    records.append({"prompt": "Name a colour.",
                    "chosen": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
                    "rejected": [{"role": "user", "content": "Name a colour."},
                                 {"role": "assistant", "content": "I would rather not say which colour I like."}]})
    records.append({"prompt": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                               {"role": "user", "content": "What is 3 + 4?"}],
                    "chosen": [{"role": "assistant", "content": "7"}],
                    "rejected": [{"role": "assistant", "content": "3 + 4 is 8, I believe."}]})
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", records)


# ----------------------------------------------------------------------------- TRL parity on identical tensors

class _Accelerator:
    device = "cpu"

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x


def _random_logps(seed, pairs=4, length=12):
    """Per-token policy log-probs [2 * pairs, length - 1] (chosen rows first, as TRL), a completion
    mask [2 * pairs, length] (never on token 0) and reference sums [2 * pairs]."""
    rng = np.random.RandomState(seed)
    mask = np.zeros((2 * pairs, length), np.float32)
    for row in range(2 * pairs):
        start = rng.randint(2, 6)
        mask[row, start:rng.randint(start + 1, length + 1)] = 1
    per_token = -rng.uniform(0.05, 3.0, (2 * pairs, length - 1)).astype(np.float32)
    reference = -rng.uniform(5.0, 20.0, 2 * pairs).astype(np.float32)
    return per_token, mask, reference


def trl_dpo_loss(loss_type, per_token, mask, reference, label_smoothing=0.0, model=None, inputs=None, ref_model=None):
    """TRL's DPOTrainer._compute_loss (unbound, with a stand-in self) on per-token log-probs:
    returns (loss, d loss / d per-token log-probs, TRL's logged metrics)."""
    import torch
    from trl.trainer.dpo_trainer import DPOTrainer
    leaf = None
    if model is None:
        leaf = torch.tensor(per_token, requires_grad=True)
        shifted = torch.tensor(mask[:, 1:])

        class Model:  # the fused LM head's outputs: log-probs of the labels, 0 off the completion
            training = True

            def __call__(self, **kwargs):
                zeros = torch.zeros_like(leaf)
                return types.SimpleNamespace(log_probs=leaf * shifted, entropy=zeros, mean_logits=zeros,
                                             is_top1=zeros.bool())
        model = Model()
        half = len(mask) // 2
        inputs = {"input_ids": torch.zeros(mask.shape, dtype=torch.long),
                  "attention_mask": torch.ones(mask.shape, dtype=torch.long),
                  "completion_mask": torch.tensor(mask, dtype=torch.long),
                  "ref_chosen_logps": torch.tensor(reference[:half]), "ref_rejected_logps": torch.tensor(reference[half:])}
    stand_in = types.SimpleNamespace(
        model=model, ref_model=ref_model, accelerator=_Accelerator(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=ref_model is None, f_divergence_type="reverse_kl", loss_types=[loss_type],
        loss_weights=[1.0], beta=BETA, label_smoothing=label_smoothing, use_weighting=False,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None))
    loss = DPOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)
    metrics = stand_in._metrics["train" if model.training else "eval"]
    if leaf is None:
        return loss.item(), None, metrics
    loss.backward()
    return loss.item(), leaf.grad.numpy(), metrics


def trl_length_normalized_loss(loss_type, per_token, mask, beta, label_smoothing=0.0, gamma=0.5, logratios=None):
    """ORPO (ORPOTrainer.odds_ratio_loss + the chosen responses' NLL), SimPO and cDPO
    (CPOTrainer.cpo_loss, no NLL: cpo_alpha=0) on length-averaged (or, for cDPO, summed-ratio)
    log-probs, computed from per-token log-probs as TRL's get_batch_logps does."""
    import torch
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    leaf = torch.tensor(per_token, requires_grad=True)
    shifted = torch.tensor(mask[:, 1:])
    half = len(mask) // 2
    stand_in = types.SimpleNamespace(beta=beta, accelerator=_Accelerator(), alpha=0.0, label_smoothing=label_smoothing,
                                     simpo_gamma=gamma, loss_type="sigmoid" if loss_type == "cdpo" else loss_type)
    if loss_type == "cdpo":  # cDPO = CPO's smoothed sigmoid on the policy/reference log-ratios
        sums = (leaf * shifted).sum(-1) - torch.tensor(logratios)
        losses, _, _ = CPOTrainer.cpo_loss(stand_in, sums[:half], sums[half:])
        loss = losses.mean()
    else:
        average = (leaf * shifted).sum(-1) / shifted.sum(-1)
        if loss_type == "orpo":
            odds_terms, _, _, _, _ = ORPOTrainer.odds_ratio_loss(stand_in, average[:half], average[half:])
            loss = -average[:half].mean() - odds_terms.mean()  # the paper's NLL of the chosen response
        else:
            losses, _, _ = CPOTrainer.cpo_loss(stand_in, average[:half], average[half:])
            loss = losses.mean()
    loss.backward()
    return loss.item(), leaf.grad.numpy()


def our_loss(options, per_token, mask, reference):
    half = len(mask) // 2

    def mean_loss(per_token):
        sums, counts = dpo.sequence_logps(per_token, jnp.asarray(mask[:, 1:]))
        losses, chosen_rewards, rejected_rewards = dpo.preference_losses(
            options, sums[:half], sums[half:], counts[:half], counts[half:], jnp.asarray(reference[:half]),
            jnp.asarray(reference[half:]))
        return losses.mean(), (chosen_rewards, rejected_rewards)

    (loss, rewards), grads = jax.value_and_grad(mean_loss, has_aux=True)(jnp.asarray(per_token))
    return float(loss), np.asarray(grads), rewards


PARITY_CASES = {  # name -> (our options, how TRL computes it)
    "sigmoid": (dict(loss_type="sigmoid"), "dpo"),
    "cdpo": (dict(loss_type="sigmoid", label_smoothing=0.2), "cdpo"),
    "ipo": (dict(loss_type="ipo"), "dpo"),
    "hinge": (dict(loss_type="hinge"), "dpo"),
    "robust": (dict(loss_type="robust", label_smoothing=0.2), "dpo"),
    "reference_free": (dict(loss_type="sigmoid", reference_free=True), "dpo"),
    "orpo": (dict(loss_type="orpo"), "length"),
    "simpo": (dict(loss_type="simpo", beta=2.0, simpo_gamma=0.8, label_smoothing=0.1), "length"),
}


@pytest.mark.parametrize("case", PARITY_CASES)
def test_losses_and_gradients_match_trl(case):
    options, how = PARITY_CASES[case]
    options = dpo.PreferenceConfig(**{"beta": BETA, **options})
    per_token, mask, reference = _random_logps(seed=len(case))
    ours, our_grads, (chosen_rewards, rejected_rewards) = our_loss(options, per_token, mask, reference)
    if how == "dpo":
        trl_reference = np.zeros_like(reference) if options.reference_free else reference
        theirs, their_grads, metrics = trl_dpo_loss(options.loss_type, per_token, mask, trl_reference,
                                                    options.label_smoothing)
        np.testing.assert_allclose(float(chosen_rewards.mean()), metrics["rewards/chosen"][0], rtol=1e-5)
        np.testing.assert_allclose(float(rejected_rewards.mean()), metrics["rewards/rejected"][0], rtol=1e-5)
    elif how == "cdpo":
        theirs, their_grads = trl_length_normalized_loss("cdpo", per_token, mask, options.beta,
                                                         options.label_smoothing, logratios=reference)
    else:
        theirs, their_grads = trl_length_normalized_loss(options.loss_type, per_token, mask, options.beta,
                                                         options.label_smoothing, options.simpo_gamma)
    loss_diff, grad_diff = abs(ours - theirs), float(np.abs(our_grads - their_grads).max())
    print(f"\nTRL parity {case}: loss {ours:.6f} vs {theirs:.6f}, max |loss diff| {loss_diff:.2e}, "
          f"max |grad diff| {grad_diff:.2e}")
    assert loss_diff <= 1e-6 * max(1.0, abs(theirs))
    assert grad_diff <= 1e-6 and np.abs(their_grads).max() > 0


def test_token_logps_match_trl_selective_log_softmax():
    import torch
    from trl.trainer.utils import selective_log_softmax
    rng = np.random.RandomState(0)
    logits = rng.normal(0, 3, (3, 7, 50)).astype(np.float32)
    targets = rng.randint(0, 50, (3, 7))
    theirs = selective_log_softmax(torch.tensor(logits), torch.tensor(targets)).numpy()
    np.testing.assert_allclose(np.asarray(dpo.token_logps(jnp.asarray(logits), jnp.asarray(targets))), theirs,
                               atol=1e-5)


# ----------------------------------------------------------------------------- end to end

def trl_rows(rows, pad_token_id):
    """Our pair rows -> TRL's DPO batch: [chosen rows; rejected rows], right-padded, with the
    completion mask on the response tokens themselves (our loss_mask is on the predicting token)."""
    import torch
    input_ids = np.concatenate([rows["chosen_input_ids"], rows["rejected_input_ids"]])
    attention = np.concatenate([rows["chosen_segment_ids"], rows["rejected_segment_ids"]]) > 0
    loss_mask = np.concatenate([rows["chosen_loss_mask"], rows["rejected_loss_mask"]])
    completion = np.zeros_like(loss_mask)
    completion[:, 1:] = loss_mask[:, :-1]
    input_ids = np.where(attention, input_ids, pad_token_id)
    return {"input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(attention, dtype=torch.long),
            "completion_mask": torch.tensor(completion, dtype=torch.long)}


@pytest.mark.parametrize("reference", ["copy", "free"])
def test_first_logged_loss_equals_transformers_and_trl(tiny_chat_model, pair_file, tmp_path, reference):
    """One step of train_dpo (all weights): the logged loss and policy log-probs equal TRL's
    DPOTrainer._compute_loss on a transformers forward of the same HF weights and tokens, with a
    reference model copy (policy = reference at step 0, so the loss is log 2 and the log-probs carry
    the check) or reference-free (the loss itself depends on the log-probs)."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head
    out = tmp_path / "run"
    run(make_cfg(tiny_chat_model, pair_file, out, reference_free=reference == "free"))
    first = logged(out)[0]

    tokenizer = easytune.load(tiny_chat_model).tokenizer
    records, locations = data.load_pairs(pair_file)
    rows, _ = data.pair_rows(records, tokenizer, tokenizer.chat_template, 128, pair_file, locations)
    inputs = trl_rows(rows, tokenizer.pad_token_id)
    policy = AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float32)
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    ref_model = None
    if reference == "copy":
        ref_model = AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float32).eval()
        add_fused_lm_head(ref_model)
    else:
        half = len(rows["chosen_input_ids"])
        inputs.update(ref_chosen_logps=torch.zeros(half), ref_rejected_logps=torch.zeros(half))
    with torch.no_grad():
        theirs, _, metrics = trl_dpo_loss("sigmoid", None, None, None, model=policy, inputs=inputs, ref_model=ref_model)
    print(f"\nend to end ({reference}): logged {first['loss']:.7f}, transformers + TRL {theirs:.7f}")
    np.testing.assert_allclose(first["loss"], theirs, rtol=2e-6)
    np.testing.assert_allclose(first["logps/chosen"], metrics["logps/chosen"][0], rtol=2e-5)
    np.testing.assert_allclose(first["logps/rejected"], metrics["logps/rejected"][0], rtol=2e-5)
    np.testing.assert_allclose(first["rewards/margin"], metrics["rewards/margins"][0], atol=1e-5, rtol=1e-4)
    if reference == "copy":
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    else:
        assert abs(first["loss"] - math.log(2)) > 1e-2


def test_reference_copy_and_precomputed_reference_train_alike(tiny_chat_model, pair_file, tmp_path):
    results = {}
    for mode in ("copy", "precomputed"):
        out = tmp_path / mode
        summary = run(make_cfg(tiny_chat_model, pair_file, out, total_steps=2, mesh_dim="2,2,2", eval_data=pair_file,
                               batch_size=4, precompute_reference=mode == "precomputed"))
        results[mode] = (summary, logged(out))
    (copy, copy_log), (pre, pre_log) = results["copy"], results["precomputed"]
    assert copy["reference"] == "copy" and pre["reference"] == "precomputed"
    # the copy is one more set of weights, without optimizer state; precomputing holds none
    assert copy["train_state_bytes"]["frozen"] == copy["train_state_bytes"]["params"] > 0
    assert pre["train_state_bytes"]["frozen"] == 0
    assert os.path.exists(tmp_path / "precomputed" / "reference_logps_train.npz")
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "logps/chosen"):
        np.testing.assert_allclose([r[key] for r in pre_log], [r[key] for r in copy_log], rtol=1e-5, atol=1e-6)
    for key in ("eval_loss", "eval_rewards/margin", "eval_rewards/accuracy"):  # eval (2 batches of 4 pairs) too
        np.testing.assert_allclose(pre[key], copy[key], rtol=1e-5, atol=1e-6)
    assert "eval_perplexity" not in copy
    assert copy_log[-1]["rewards/margin"] != 0  # the policy moved away from the reference


def test_lora_reference_is_the_base_without_a_copy(tiny_chat_model, pair_file, tmp_path):
    model = easytune.load(tiny_chat_model)
    cfg = make_cfg(tiny_chat_model, pair_file, tmp_path / "probe", peft="lora")
    attach_adapter(model, cfg)
    trainer = train.Trainer(train.TrainConfig.from_flags(cfg), model, dpo.make_loss(dpo.PreferenceConfig()), 1)
    assert trainer.frozen is model.params  # the reference is the base the adapter sits on: no copy
    assert trainer.state_bytes()["frozen"] == adapters.nbytes(model.params)
    assert trainer.state_bytes()["params"] == adapters.nbytes(model.adapter.params)

    out = tmp_path / "run"
    summary = run(make_cfg(tiny_chat_model, pair_file, out, peft="lora", total_steps=2,
                           **{"lora.rank": 4, "lora.dropout": 0.1}))
    records = logged(out)
    assert summary["reference"] == "base (adapter off)"
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: policy == reference
    assert records[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    assert records[-1]["rewards/margin"] != pytest.approx(0.0, abs=1e-5)
    trained = easytune.load(str(out), tokenizer=False)
    assert trained.adapter is not None


def test_a_loss_without_reference_holds_nothing_frozen(tiny_chat_model, pair_file, tmp_path):
    summary = run(make_cfg(tiny_chat_model, pair_file, tmp_path / "simpo", loss_type="simpo", total_steps=2, beta=2.0,
                           simpo_gamma=0.5))
    assert summary["reference"] == "none" and summary["train_state_bytes"]["frozen"] == 0
    assert np.isfinite(summary["last_loss"]) and summary["last_loss"] != summary["first_loss"]


# ----------------------------------------------------------------------------- data

@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model):
    return easytune.load(tiny_chat_model).tokenizer


def test_layouts_tokenize_alike_and_mask_only_the_response(tokenizer):
    template = tokenizer.chat_template
    user = {"role": "user", "content": "What is 2 + 2?"}
    good, bad = {"role": "assistant", "content": "4"}, {"role": "assistant", "content": "5"}
    layouts = [
        {"prompt": user["content"], "chosen": "4", "rejected": "5"},
        {"prompt": user["content"], "chosen": [user, good], "rejected": [user, bad]},  # UltraFeedback-binarized
        {"prompt": [user], "chosen": [good], "rejected": [bad]},
        {"prompt": user["content"], "chosen": [good], "rejected": [bad]},
        {"chosen": [user, good], "rejected": [user, bad]},
    ]
    pairs, stats = preference.tokenize_pairs(layouts, tokenizer, template, 256, "layouts")
    assert stats.num_kept == len(layouts)
    for pair in pairs[1:]:
        assert pair.chosen == pairs[0].chosen and pair.rejected == pairs[0].rejected
    chosen = pairs[0].chosen
    trained = tokenizer.decode([t for t, m in zip(chosen.input_ids, chosen.loss_mask) if m])
    assert trained.startswith("4") and "2 + 2" not in trained and "assistant" not in trained
    # a multi-turn prompt: its assistant turn is context, only the response trains
    multi = {"prompt": [user, good, {"role": "user", "content": "And 3 + 3?"}],
             "chosen": [{"role": "assistant", "content": "6"}], "rejected": [{"role": "assistant", "content": "7"}]}
    (pair,), _ = preference.tokenize_pairs([multi], tokenizer, template, 256, "multi")
    assert tokenizer.decode([t for t, m in zip(pair.chosen.input_ids, pair.chosen.loss_mask) if m]).startswith("6")
    rows = preference.make_pair_rows(pairs, 256)
    assert rows["chosen_input_ids"].shape[1] % 8 == 0 and rows["chosen_input_ids"].shape[1] < 256  # trimmed


def test_pairs_truncated_away_are_counted(tokenizer):
    long = {"prompt": "word " * 100, "chosen": "yes", "rejected": "no"}
    fine = {"prompt": "Say yes.", "chosen": "yes", "rejected": "Absolutely not, I refuse to say it." * 4}
    pairs, stats = preference.tokenize_pairs([long, fine, long], tokenizer, tokenizer.chat_template, 64, "t")
    assert (stats.num_kept, stats.num_dropped, stats.num_dropped_chosen, stats.num_dropped_rejected) == (1, 2, 2, 2)
    assert stats.num_truncated == 1  # the kept pair's long rejected response lost tokens
    assert "2 dropped" in stats.summary()


@pytest.mark.parametrize("records,message", [
    ([{"prompt": "Hi", "chosen": "a", "rejected": "b"},
      {"prompt": "What is 2+2?", "chosen": [{"role": "user", "content": "What is 2+2?"},
                                           {"role": "assistant", "content": "4"}],
       "rejected": [{"role": "user", "content": "What is 3+3?"}, {"role": "assistant", "content": "6"}]}],
     r"pairs.jsonl line 2: the 'prompt' field does not match the prompt turns of 'rejected'"),
    ([{"chosen": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "a"}],
       "rejected": [{"role": "user", "content": "B?"}, {"role": "assistant", "content": "b"}]}],
     r"pairs.jsonl line 1: chosen and rejected have different prompts"),
    ([{"prompt": "Hi", "chosen": "a", "rejected": "b"}, {"prompt": "Hi", "chosen": "a"}],
     r"pairs.jsonl line 2: missing 'rejected'"),
    ([{"prompt": "Hi", "completion": "a"}], r"pairs.jsonl line 1: missing 'chosen' and 'rejected'"),
    ([{"chosen": "a", "rejected": "b"}], r"pairs.jsonl line 1: 'chosen' is a string, so the pair needs a 'prompt'"),
    ([{"prompt": "Hi", "chosen": "a", "rejected": "b", "margin": "big"}], r"line 1: 'margin' must be a finite number"),
    ([{"prompt": "word " * 200, "chosen": "a", "rejected": "b"}],
     r"all 1 pairs of .*pairs.jsonl have an empty chosen or rejected response after truncation to seq_length=128"),
])
def test_bad_pairs_are_one_clear_error(tiny_chat_model, tmp_path, records, message):
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as f:  # a blank line: errors still name the file's own line numbers
        f.write(json.dumps(records[0]) + "\n\n" * (len(records) > 1) + "".join(json.dumps(r) + "\n" for r in records[1:]))
    if len(records) > 1:
        message = message.replace("line 2", "line 3")
    with pytest.raises(ValueError, match=message):
        run(make_cfg(tiny_chat_model, str(path), tmp_path / "out"))


def test_bad_options_are_clear_errors(tiny_chat_model, pair_file, tmp_path):
    with pytest.raises(ValueError, match="unknown --loss_type 'kto'"):
        run(make_cfg(tiny_chat_model, pair_file, tmp_path / "a", loss_type="kto"))
    with pytest.raises(ValueError, match="robust loss needs 0 <= --label_smoothing < 0.5"):
        run(make_cfg(tiny_chat_model, pair_file, tmp_path / "b", loss_type="robust", label_smoothing=0.5))
    with pytest.raises(ValueError, match="--precompute_reference has nothing to compute: the orpo loss"):
        run(make_cfg(tiny_chat_model, pair_file, tmp_path / "c", loss_type="orpo", precompute_reference=True))


def test_task_pairs_prefer_the_exact_answer():
    records = data.make_task_records(60, seed=0)
    pairs = data.task_pairs(records, seed=0, generations=["The answer is " + r["answer"] for r in records])
    assert all(p["chosen"] == r["answer"] and p["rejected"] != p["chosen"] for p, r in zip(pairs, records))
    assert all(p["rejected_source"] == "model" for p in pairs)
    perturbed = data.task_pairs(records, seed=0, generations=[r["answer"] for r in records])  # right: perturb
    assert all(p["rejected_source"] == "perturbed" and not data.exact_match(p["rejected"], r["answer"])
               for p, r in zip(perturbed, records))


def test_help_documents_every_flag():
    result = subprocess.run([sys.executable, "-m", "easytune.train_dpo", "--help"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    for name in DOCS:
        assert f"--{name}:" in result.stdout or f"--[no]{name}:" in result.stdout, name
