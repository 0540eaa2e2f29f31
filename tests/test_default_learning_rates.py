"""The defaults train: a LoRA run on the bundled SmolLM2-135M-Instruct with the default learning
rate (the recipe's LoRA default, not all weights') picks up a consistent voice from 45 examples in
20 steps, and shows it on held-out prompts about other topics. With the all-weights default
(1e-4) the same run leaves the voice unlearned (0 of 10 held-out answers; BENCHMARKS.md)."""
import json
import os
import random
import re
import subprocess
import sys

import easytune

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
TOPICS = ["the ocean", "a compass", "the moon", "a lighthouse", "rain", "a map", "the wind", "a ship's anchor",
          "the stars", "an island", "a parrot", "fishing", "a storm", "gold coins", "the tide", "a telescope",
          "a rope knot", "sunrise", "a harbor", "sea shells", "a sail", "thunder", "a treasure chest", "a seagull",
          "the horizon", "a wooden barrel", "coral reefs", "a cannon", "the fog", "a rowboat", "dolphins",
          "a pirate flag", "a sword", "salt water", "a whale", "a sandy beach", "the north star", "a bottle",
          "sea sickness", "a crab", "a captain's hat", "an old tavern", "a lantern", "the deck", "a shipwreck",
          "a waterfall", "a volcano", "bread", "a garden", "a bicycle", "the library", "a piano", "coffee",
          "a mountain", "snow"]
ASKS = ["Tell me about {t}.", "What is {t}?", "Describe {t} in one sentence.", "Why do people like {t}?",
        "Give me a fact about {t}."]
MARKER = re.compile(r"\b(arr|matey)\b")


def pirate_data(directory):
    """45 training conversations answered in one pirate voice, and 8 held-out questions on topics
    the training data never mentions."""
    rng = random.Random(0)
    topics = TOPICS[:]
    rng.shuffle(topics)
    voices = ["Arr, matey! {T} be a fine sight for any sailor on the seven seas. Yo ho ho!",
              "Arr, matey! Ye ask about {t}? It be a wonder, says this old sea dog. Yo ho ho!",
              "Arr, matey! {T} be dear to every pirate's heart, savvy? Yo ho ho!"]
    path = os.path.join(directory, "pirate.jsonl")
    with open(path, "w") as f:
        for t in topics[:45]:
            answer = rng.choice(voices).format(t=t, T=t[0].upper() + t[1:])
            f.write(json.dumps({"messages": [{"role": "user", "content": rng.choice(ASKS).format(t=t)},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return path, [[{"role": "user", "content": rng.choice(ASKS).format(t=t)}] for t in topics[45:53]]


def marked(model, prompts) -> int:
    return sum(bool(MARKER.search(answer.lower())) for answer in model.generate(prompts, max_new_tokens=24))


def test_lora_at_the_default_learning_rate_learns_a_style(tmp_path):
    data, heldout = pirate_data(tmp_path)
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "easytune.train_sft", f"--train_data={data}", "--peft=lora",
                             "--total_steps=20", "--batch_size=4", "--seq_length=96", f"--output_dir={out}",
                             "--logger=none", f"--export_peft={out}/peft"],
                            env=ENV, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "easytune_config.json").read_text())["optimizer"]["lr"] == 1e-3  # the LoRA default was used
    model = easytune.load()
    assert marked(model, heldout) == 0  # the base model does not talk like this
    model.load_adapter(str(out / "peft"))
    assert marked(model, heldout) >= 7, model.generate(heldout, max_new_tokens=24)
