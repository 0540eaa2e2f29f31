"""Shared test setup: 8 simulated CPU devices (set before JAX is imported) and tiny HF models."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One persistent compilation cache for the whole test run: the pytest process makes it before its
# xdist workers start, and they, and the training and evaluation subprocesses the tests launch
# (which inherit the environment), read and write it. The suite compiles the same programs many
# times (a run and its resume, two processes of one job, the same tiny model in several tests);
# on the 2-core CI machine this took test_train_peft + test_ppo from 399 s to 313 s with a cache
# that starts empty. It is removed when the run ends, so nothing carries over between runs or
# machines; a JAX_COMPILATION_CACHE_DIR set by the caller is used as it is.
_OWN_COMPILATION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile
    _OWN_COMPILATION_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
        prefix="easytune-tests-jax-cache-")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (transformers class name, config overrides). Each exercises one architectural feature.
TINY_CONFIGS = {
    "llama2": ("LlamaForCausalLM", dict(rms_norm_eps=1e-5)),
    "llama3_gqa_rope_scaling": ("LlamaForCausalLM", dict(
        num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8})),
    "llama_tied_mqa": ("LlamaForCausalLM", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "llama_linear_rope_bias": ("LlamaForCausalLM", dict(
        rope_scaling={"rope_type": "linear", "factor": 2.0}, attention_bias=True, mlp_bias=True)),
    "mistral_sliding_window": ("MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=5)),
    # Qwen2: q/k/v bias, untied; and tied MQA with sliding layers from max_window_layers on
    "qwen2": ("Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "qwen2_tied_mqa_sliding": ("Qwen2ForCausalLM", dict(
        tie_word_embeddings=True, num_key_value_heads=1, use_sliding_window=True, sliding_window=5,
        max_window_layers=1)),
    # Qwen3: per-head q/k RMSNorm; head_dim (32) not hidden / heads
    "qwen3_qk_norm": ("Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=32, rope_theta=1e6)),
    # Gemma 2: (1 + w) norms, scaled embeddings, GeGLU, four norms per layer, sliding/global
    # alternation with a window shorter than the sequence, and both soft-caps small enough (and the
    # weights large enough) to bite
    "gemma2_softcap": ("Gemma2ForCausalLM", dict(
        num_key_value_heads=2, head_dim=16, sliding_window=5, query_pre_attn_scalar=24,
        attn_logit_softcapping=0.5, final_logit_softcapping=1.5, initializer_range=0.1)),
    # Gemma 3 text: q/k norms, local layers with their own RoPE base, global layers with linear scaling
    "gemma3_local_global": ("Gemma3ForCausalLM", dict(
        num_hidden_layers=3, num_key_value_heads=1, head_dim=16, sliding_window=5, query_pre_attn_scalar=16,
        tie_word_embeddings=False,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
}


def pytest_unconfigure(config):
    if _OWN_COMPILATION_CACHE is not None:
        import shutil
        shutil.rmtree(_OWN_COMPILATION_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs (and the constants they captured) after each test module: an
    xdist worker otherwise keeps every module's executables and grew past 10 GB over the suite,
    which on a 24 GB machine with two workers and the multi-process tests' own processes is what
    let the kernel's OOM killer take a multi-process test's worker."""
    yield
    import gc
    jax.clear_caches()
    gc.collect()


def run_config(defaults, overrides: dict):
    """An entry point's config: its `defaults` with `overrides` set (dotted keys for nested fields,
    e.g. "optimizer.lr"), in order."""
    from ml_collections import ConfigDict
    cfg = ConfigDict(defaults)
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return cfg


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _available_memory_mib() -> str:
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return f"{int(fields['MemAvailable'].split()[0]) // 1024} MiB"
    except (OSError, KeyError, ValueError):
        return "unknown"


def run_processes(make_commands, env, timeout: float, grace: float = 60.0, output_dir=None) -> list[str]:
    """Run the processes of one `jax.distributed` job, `make_commands(coordinator_address)`, to the
    end and return their outputs (stdout + stderr). Fails, with every process's return code (and
    the signal that ended it), the memory left on the machine and its whole output, when any exits
    non-zero or the job outlives `timeout` seconds. When one process fails the others get `grace`
    seconds to end on their own (they normally fail too: their peer is gone) and are then killed,
    so a failed job never hangs the test. A coordinator port that another process took between
    `free_port` and the bind (the only start-up race here) gets one retry on a new port."""
    import signal
    import subprocess
    import tempfile
    import time
    output_dir = output_dir or tempfile.mkdtemp(prefix="processes_")
    for attempt in range(2):
        commands = make_commands(f"127.0.0.1:{free_port()}")
        logs = [open(os.path.join(output_dir, f"process_{i}_attempt_{attempt}.log"), "w+") for i in range(len(commands))]
        procs = [subprocess.Popen(c, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
                 for c, log in zip(commands, logs)]
        start, failed_at, timed_out, killed = time.time(), None, False, set()
        while any(p.poll() is None for p in procs):
            now = time.time()
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = now
            if now - start > timeout:
                timed_out = True
            if timed_out or (failed_at is not None and now - failed_at > grace):
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        p.kill()
                        killed.add(i)
            time.sleep(0.2)
        memory = _available_memory_mib()
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
        if all(p.returncode == 0 for p in procs):
            return outputs
        if attempt == 0 and any("address already in use" in o.lower() or "failed to add port" in o.lower()
                                for o in outputs):
            continue
        report = [f"the {len(procs)}-process job failed{' (timed out after %ds)' % timeout if timed_out else ''}; "
                  f"memory available now: {memory}"]
        for i, (p, text) in enumerate(zip(procs, outputs)):
            how = f"exit code {p.returncode}"
            if i in killed:
                how = "killed by this test (timed out, or its peer had failed)"
            elif p.returncode < 0:
                how = f"killed by {signal.Signals(-p.returncode).name}"
                if p.returncode == -signal.SIGKILL:
                    how += " (not by this test: the kernel's OOM killer sends SIGKILL when memory runs out)"
            report.append(f"--- process {i}: {how}; its output ({len(text)} chars, last 6000):\n{text[-6000:]}")
        raise AssertionError("\n".join(report))
    raise AssertionError("unreachable")


def logged(output_dir):
    """The records of a run's metrics.jsonl."""
    import json
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def make_hf_model(name: str, directory, seed: int = 0, **overrides):
    """Save a tiny random HF model (`TINY_CONFIGS[name]`) to `directory`; return the torch model."""
    import torch
    import transformers

    class_name, extra = TINY_CONFIGS[name]
    model_class = getattr(transformers, class_name)
    config_class = model_class.config_class
    torch.manual_seed(seed)
    model = model_class(config_class(**{**TINY, **extra, **overrides})).eval()
    # Norm weights start at ones; perturb them so the tests see whether they are loaded.
    with torch.no_grad():
        for name_, param in model.named_parameters():
            if "norm" in name_ or name_.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(str(directory))
    return model


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """All tiny configs saved once per session: name -> (directory, torch model)."""
    out = {}
    for name in TINY_CONFIGS:
        directory = tmp_path_factory.mktemp(name)
        out[name] = (str(directory), make_hf_model(name, directory))
    return out


def make_chat_model(directory, class_name: str = "LlamaForCausalLM", **extra) -> str:
    """A tiny random model of `class_name` with SmolLM2's vocabulary, tokenizer and chat template."""
    import shutil

    import torch
    import transformers

    from easytune import assets
    model_class = getattr(transformers, class_name)
    torch.manual_seed(0)
    config = model_class.config_class(**{
        **dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2),
        **extra})
    model_class(config).save_pretrained(str(directory))
    source = assets.smollm2_hf_dir()
    for name in os.listdir(source):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(os.path.join(source, name), directory)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    """A tiny random LLaMA with SmolLM2's vocabulary, tokenizer and chat template."""
    return make_chat_model(tmp_path_factory.mktemp("tiny_chat"))


@pytest.fixture(scope="session")
def task_file(tmp_path_factory):
    import json

    from easytune import data
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(path, "w") as f:
        for record in data.make_task_records(96, seed=1):
            f.write(json.dumps({"messages": record["messages"]}) + "\n")
    return str(path)


def make_char_chat_model(directory, class_name: str = "LlamaForCausalLM", **extra) -> str:
    """A tiny random `class_name` model with a character-level tokenizer (54 tokens: digits,
    letters, a few signs, specials) and a chat template: small enough that RL moves its sampling in
    a few steps."""
    import torch
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    directory = str(directory)
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {token: i for i, token in enumerate(specials + list("0123456789abcdefghijklmnopqrstuvwxyz +-*?.,:'"))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>", additional_special_tokens=specials[4:])
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    model_class = getattr(transformers, class_name)
    config = model_class.config_class(**{
        **dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               bos_token_id=1, eos_token_id=2, pad_token_id=0),
        **extra})
    model_class(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def char_chat_model(tmp_path_factory):
    """A tiny random LLaMA with a character-level tokenizer (`make_char_chat_model`)."""
    return make_char_chat_model(tmp_path_factory.mktemp("char_chat"))
