"""Reward models: the Bradley-Terry loss against TRL's RewardTrainer, train_reward end to end against
transformers + TRL, and the HF *ForSequenceClassification export (scores equal in transformers and
through easytune.load(...).score)."""
import collections
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import easytune
from easytune import data
from easytune.algos import reward
from easytune.train_reward import DEFAULTS, DOCS, run

from conftest import logged, run_config

CENTER = 0.01


def make_cfg(model, train_data, output_dir, **overrides):
    return run_config(DEFAULTS, {"model": model, "train_data": train_data, "output_dir": str(output_dir),
                                 "logger": "none", "seq_length": 128, "batch_size": 8, "total_steps": 1,
                                 "log_steps": 1, **overrides, "optimizer.lr": 1e-3})


def trl_reward_loss(rewards, margin=None, center=None, model=None, inputs=None):
    """TRL's RewardTrainer.compute_loss (unbound, with a stand-in self): (loss, d loss / d rewards,
    TRL's metrics). `rewards` [2 * pairs] (chosen first) stand in for the model's scores, or a real
    `model` scores `inputs`."""
    import torch
    from trl.trainer.reward_trainer import RewardTrainer
    leaf = None
    if model is None:
        leaf = torch.tensor(rewards, requires_grad=True)

        class Model:
            training = True

            def __call__(self, **kwargs):
                return types.SimpleNamespace(logits=leaf[:, None])
        model = Model()
        inputs = {"input_ids": torch.zeros((len(rewards), 4), dtype=torch.long),
                  "attention_mask": torch.ones((len(rewards), 4), dtype=torch.long)}
        if margin is not None:
            inputs["margin"] = torch.tensor(margin)
    accelerator = types.SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x)
    stand_in = types.SimpleNamespace(model=model, accelerator=accelerator, _total_train_tokens=0, _tp_size=1,
                                     args=types.SimpleNamespace(center_rewards_coefficient=center),
                                     _metrics={"train": collections.defaultdict(list),
                                               "eval": collections.defaultdict(list)})
    loss = RewardTrainer.compute_loss(stand_in, model, inputs)
    metrics = stand_in._metrics["train" if model.training else "eval"]
    if leaf is None:
        return loss.item(), None, metrics
    loss.backward()
    return loss.item(), leaf.grad.numpy(), metrics


@pytest.mark.parametrize("margin,center", [(False, None), (True, None), (True, CENTER)])
def test_bradley_terry_loss_and_gradients_match_trl(margin, center):
    rng = np.random.RandomState(0)
    rewards = rng.normal(0, 2, 16).astype(np.float32)
    margins = rng.uniform(0, 1, 8).astype(np.float32) if margin else None

    def mean_loss(r):
        losses = reward.bradley_terry_losses(r[:8], r[8:], None if margins is None else jnp.asarray(margins),
                                             center or 0.0)
        return losses.mean()

    ours, our_grads = jax.value_and_grad(mean_loss)(jnp.asarray(rewards))
    theirs, their_grads, metrics = trl_reward_loss(rewards, margins, center)
    loss_diff, grad_diff = abs(float(ours) - theirs), float(np.abs(np.asarray(our_grads) - their_grads).max())
    print(f"\nTRL parity reward (margin={margin}, center={center}): max |loss diff| {loss_diff:.2e}, "
          f"max |grad diff| {grad_diff:.2e}")
    assert loss_diff <= 1e-6 * max(1.0, theirs) and grad_diff <= 1e-7


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    """8 pairs (one batch), half of them with a margin."""
    pairs = data.task_pairs(data.make_task_records(8, seed=5), seed=0)
    records = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"], "margin": 0.5 * (i % 2)}
               for i, p in enumerate(pairs)]
    path = tmp_path_factory.mktemp("reward") / "pairs.jsonl"
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def padded(sequences, pad_token_id):
    import torch
    length = max(map(len, sequences))
    ids = torch.tensor([s + [pad_token_id] * (length - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in sequences])
    return ids, mask


def test_train_reward_matches_trl_and_exports_to_transformers(tiny_chat_model, pair_file, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification
    out, hf_dir = tmp_path / "run", tmp_path / "hf"
    summary = run(make_cfg(tiny_chat_model, pair_file, out, total_steps=2, eval_data=pair_file,
                           center_rewards_coefficient=CENTER, export_hf=str(hf_dir)))
    first = logged(out)[0]

    # step 1 ran on the initial reward model: the causal LM with a fresh score head (seed 0)
    initial = reward.with_score_head(easytune.load(tiny_chat_model), seed=0)
    initial.save_pretrained(str(tmp_path / "initial"))
    tokenizer = initial.tokenizer
    records, locations = data.load_pairs(pair_file)
    pairs, _ = data.tokenize_pairs(records, tokenizer, tokenizer.chat_template, 128, pair_file, locations)
    sequences = [p.chosen.input_ids for p in pairs] + [p.rejected.input_ids for p in pairs]
    input_ids, attention_mask = padded(sequences, tokenizer.pad_token_id)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "margin": torch.tensor([r["margin"] for r in records], dtype=torch.float32)}
    hf_initial = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "initial"), dtype=torch.float32)
    with torch.no_grad():
        theirs, _, metrics = trl_reward_loss(None, center=CENTER, model=hf_initial, inputs=inputs)
    print(f"\nreward end to end: logged {first['loss']:.7f}, transformers + TRL {theirs:.7f}")
    np.testing.assert_allclose(first["loss"], theirs, rtol=1e-5)
    np.testing.assert_allclose(first["accuracy"], metrics["accuracy"][0])
    np.testing.assert_allclose(first["margin"], metrics["margin"][0], rtol=1e-4, atol=1e-6)

    # the export: transformers' LlamaForSequenceClassification gives the trained model's scores
    with open(hf_dir / "config.json") as f:
        config = json.load(f)
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["id2label"] == {"0": "LABEL_0"}
    exported = AutoModelForSequenceClassification.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    assert exported.config.num_labels == 1 and exported.config.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        hf_scores = exported(input_ids, attention_mask=attention_mask).logits[:, 0].numpy()
    for source in (str(out), str(hf_dir)):  # the run and its export, through easytune.load
        model = easytune.load(source)
        np.testing.assert_allclose(model.score(sequences), hf_scores, atol=1e-5)
    conversation = [{"role": "user", "content": records[0]["prompt"]},
                    {"role": "assistant", "content": records[0]["chosen"]}]
    assert model.score(conversation) == pytest.approx(float(hf_scores[0]), abs=1e-5)  # one chat, via the template
    # eval: pairwise accuracy of the trained model on the eval pairs
    chosen, rejected = hf_scores[:8], hf_scores[8:]
    assert summary["eval_accuracy"] == pytest.approx(float(np.mean(chosen > rejected)))
    assert summary["eval_margin"] == pytest.approx(float(np.mean(chosen - rejected)), abs=1e-5)
    assert summary["train_state_bytes"]["frozen"] == 0


def test_a_reward_run_scores_with_its_training_chat_template(tiny_chat_model, pair_file, tmp_path):
    """--chat_template=tulu is the template of the reward run's tokenizer and of its export (what
    train_ppo --reward_model reads completions with), as transformers loads them, and score renders
    a conversation with it."""
    from transformers import AutoTokenizer
    run(make_cfg(tiny_chat_model, pair_file, tmp_path / "run", chat_template="tulu", export_hf=str(tmp_path / "hf")))
    conversation = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    own = AutoTokenizer.from_pretrained(tiny_chat_model)
    tulu = f"<|user|>\nWhat is 2 + 2?\n<|assistant|>\n4{own.eos_token}"  # Tulu ends an answer with the EOS
    for directory in (tmp_path / "run", tmp_path / "hf"):
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        assert tokenizer.apply_chat_template(conversation, tokenize=False) == tulu, directory
        model = easytune.load(str(directory))
        assert model.score(conversation) == model.score(own(tulu, add_special_tokens=False)["input_ids"]), directory


@pytest.mark.parametrize("name", ["llama2", "mistral_sliding_window"])
def test_score_head_export_matches_transformers(hf_models, tmp_path, name):
    """Untied LLaMA (its LM head is dropped) and sliding-window Mistral: the reward model's export
    loads as *ForSequenceClassification with the same scores, right-padded rows of any length."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForSequenceClassification
    directory, _ = hf_models[name]
    model = reward.with_score_head(easytune.load(directory, tokenizer=False), seed=3)
    assert "lm_head" not in model.params and model.params["score"]["kernel"].shape == (64, 1)
    model.save_pretrained(str(tmp_path / "rm"))
    tensors = load_file(str(tmp_path / "rm" / "model.safetensors"))
    assert "score.weight" in tensors and "lm_head.weight" not in tensors
    rng = np.random.RandomState(0)
    sequences = [rng.randint(3, 128, n).tolist() for n in (9, 4, 12)]  # 0 is the pad token
    exported = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm"), dtype=torch.float32).eval()
    assert type(exported).__name__ == {"llama2": "LlamaForSequenceClassification",
                                       "mistral_sliding_window": "MistralForSequenceClassification"}[name]
    input_ids, attention_mask = padded(sequences, exported.config.pad_token_id)
    with torch.no_grad():
        theirs = exported(input_ids, attention_mask=attention_mask).logits[:, 0].numpy()
    np.testing.assert_allclose(model.score(sequences), theirs, atol=1e-5)
    np.testing.assert_allclose(easytune.load(str(tmp_path / "rm"), tokenizer=False).score(sequences), theirs, atol=1e-5)


def test_with_score_head_is_a_new_handle_and_leaves_the_causal_lm_as_it_was(hf_models):
    directory, _ = hf_models["llama2"]
    base = easytune.load(directory, tokenizer=False)
    tokens = [[3, 4, 5, 6, 7]]
    logits = np.asarray(base(tokens))
    scorer = reward.with_score_head(base, seed=3)
    assert scorer is not base and scorer.config.num_labels == 1 and scorer.source == base.source
    assert base.config.num_labels == 0 and "lm_head" in base.params and "score" not in base.params
    assert scorer.params["embed"]["embedding"] is base.params["embed"]["embedding"]  # shared, not copied
    np.testing.assert_array_equal(np.asarray(base(tokens)), logits)  # the LM still answers as before
    assert isinstance(scorer.score(tokens[0]), float)
    assert reward.with_score_head(scorer, seed=4) is scorer  # already a reward model


def test_score_needs_a_score_head(hf_models):
    model = easytune.load(hf_models["llama2"][0], tokenizer=False)
    with pytest.raises(ValueError, match="has no score head"):
        model.score([[3, 4, 5]])


def test_help_documents_every_flag():
    result = subprocess.run([sys.executable, "-m", "easytune.train_reward", "--help"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    for name in DOCS:
        assert f"--{name}:" in result.stdout or f"--[no]{name}:" in result.stdout, name
