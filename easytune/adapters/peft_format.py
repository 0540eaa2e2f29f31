"""Adapters in the `peft` library's format: `adapter_config.json` + `adapter_model.safetensors`,
written so `peft.PeftModel.from_pretrained(hf_base, dir)` gives the same logits, and read back
(from easytune or from peft) onto an easytune base model.

LoRA/DoRA tensors: `base_model.model.<hf module>.lora_A.weight [r, in]`, `.lora_B.weight
[out, r]`, `.lora_magnitude_vector [out]`. Prompt learning: `prompt_embeddings`, the encoder's
output (peft keeps only that for inference), `[n, hidden]` for prompt/P-tuning and
`[n, layers * 2 * kv_dim]` for prefix tuning.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from easytune import adapters as ad
from easytune.distributed import host_array
from easytune.safetensors_io import write_safetensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
PEFT_TYPES = {"lora": "LORA", "qlora": "LORA", "dora": "LORA", "prompt": "PROMPT_TUNING",
              "ptuning": "P_TUNING", "prefix": "PREFIX_TUNING"}


def is_peft_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def _modules_by_path(model_config) -> dict[str, ad.LinearModule]:
    return {"/".join(m.path): m for m in ad.linear_modules(model_config)}


def adapter_config_json(adapter: ad.Adapter, model_config, base_model: str | None) -> dict:
    c = adapter.config
    out = {"peft_type": PEFT_TYPES[c.method], "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
           "inference_mode": True, "revision": None}
    if c.is_lora:
        modules = _modules_by_path(model_config)
        out.update({
            "r": c.rank, "lora_alpha": c.alpha, "lora_dropout": c.dropout, "use_rslora": c.use_rslora,
            "use_dora": c.use_dora, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {},
            # the HF module names themselves: exact, whatever patterns selected them
            "target_modules": sorted({modules[m].hf_module.rsplit(".", 1)[-1] for m in c.modules}),
        })
        return out
    mc = model_config
    out.update({"num_virtual_tokens": c.num_virtual_tokens, "token_dim": mc.hidden_size,
                "num_transformer_submodules": 1, "num_attention_heads": mc.num_heads, "num_layers": mc.num_layers})
    if c.method == "prompt":
        out["prompt_tuning_init"] = "RANDOM"
    elif c.method == "ptuning":
        out.update({"encoder_reparameterization_type": c.encoder_type.upper(),
                    "encoder_hidden_size": c.encoder_hidden_size or mc.hidden_size})
    else:  # saved as the flat prefix itself, which is what peft loads in inference mode
        out.update({"prefix_projection": False, "token_dim": mc.num_kv_heads * mc.head_dim,
                    "num_attention_heads": mc.num_kv_heads, "encoder_hidden_size": mc.num_kv_heads * mc.head_dim})
    return out


def save(directory: str, adapter: ad.Adapter, model_config, base_model: str | None = None) -> None:
    """Write `adapter` as a peft adapter directory (every process calls it; process 0 writes)."""
    c = adapter.config
    tensors = []
    if c.is_lora:
        modules = _modules_by_path(model_config)
        for module_path in c.modules:
            module = modules[module_path]
            node = ad._get(adapter.params, tuple(module_path.split("/")))
            host = {k: host_array(v).astype(np.float32) for k, v in node.items()}
            layers = range(len(ad.module_names(model_config, module))) if module.stacked else [None]
            for layer in layers:
                name = PREFIX + module.hf_module.format(layer=layer)
                pick = (lambda x: x[layer]) if layer is not None else (lambda x: x)
                tensors.append((name + ".lora_A.weight", np.ascontiguousarray(pick(host["lora_a"]).T)))
                tensors.append((name + ".lora_B.weight", np.ascontiguousarray(pick(host["lora_b"]).T)))
                if "lora_magnitude" in host:
                    tensors.append((name + ".lora_magnitude_vector", pick(host["lora_magnitude"])))
    else:
        tensors.append(("prompt_embeddings", host_array(ad.virtual_embeddings(c, adapter.params)).astype(np.float32)))
    if jax.process_index() != 0:
        return
    os.makedirs(directory, exist_ok=True)
    write_safetensors(directory, [(name, t.shape, t.dtype, lambda t=t: t) for name, t in tensors],
                      filename=WEIGHTS_FILE)
    tmp = os.path.join(directory, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(adapter_config_json(adapter, model_config, base_model), f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(directory, CONFIG_FILE))


def read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}: it is not a peft adapter directory.")
    with open(path) as f:
        return json.load(f)


def load(directory: str, model_config, base: dict, mesh) -> ad.Adapter:
    """Read a peft adapter directory onto an easytune base; the tensors are checked against the
    base's shapes, so an adapter trained on another model is a clear error."""
    cfg = read_config(directory)
    peft_type = cfg.get("peft_type")
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_FILE} (a .bin adapter? re-save it with "
                                f"safe_serialization=True).")
    from safetensors.numpy import load_file
    tensors = load_file(weights_path)
    if peft_type == "LORA":
        adapter = _load_lora(cfg, tensors, model_config, base, directory)
    elif peft_type in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
        adapter = _load_prompt(cfg, tensors, model_config, directory)
    else:
        raise ValueError(f"{directory}: peft_type {peft_type!r} is not supported; easytune reads LORA (with or "
                         f"without use_dora), PROMPT_TUNING, P_TUNING and PREFIX_TUNING adapters.")
    shardings = ad.shardings_for(adapter.params, model_config, mesh)
    adapter.params = jax.tree.map(lambda x, s: jax.device_put(x, s), adapter.params, shardings)
    return adapter


def _unsupported(cfg: dict, directory: str) -> None:
    checks = {"layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
              "fan_in_fan_out": False, "layer_replication": None}
    for key, neutral in checks.items():
        if cfg.get(key) not in (neutral, None, {}, [], False):
            raise ValueError(f"{directory}: adapter_config.json sets {key}={cfg[key]!r}, which easytune does not "
                             f"support; adapters must apply one rank and alpha to whole modules.")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{directory}: adapter_config.json has bias={cfg['bias']!r}; easytune supports bias='none'.")


def _load_lora(cfg: dict, tensors: dict, model_config, base: dict, directory: str) -> ad.Adapter:
    _unsupported(cfg, directory)
    found: dict[str, list] = {}
    modules = ad.linear_modules(model_config)
    by_name = {}
    for module in modules:
        names = ad.module_names(model_config, module)
        for layer, name in enumerate(names):
            by_name[PREFIX + name] = (module, layer if module.stacked else None)
    params: dict = {}
    for key in [k for k in tensors if k.endswith(".base_layer.weight")]:
        _check_saved_base_weight(key, tensors.pop(key), model_config, base, directory)
    for key in tensors:
        for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"):
            if key.endswith(suffix):
                stem = key[: -len(suffix)]
                if stem not in by_name:
                    raise ValueError(f"{directory}: adapter tensor {key} targets a module this "
                                     f"{model_config.model_type} model does not have.")
                found.setdefault(stem, []).append(suffix)
                break
        else:
            raise ValueError(f"{directory}: unexpected tensor {key} in a LoRA adapter.")
    rank = int(cfg["r"])
    chosen = []
    for module in modules:
        names = [PREFIX + n for n in ad.module_names(model_config, module)]
        present = [n in found for n in names]
        if not any(present):
            continue
        if not all(present):
            raise ValueError(f"{directory}: the adapter covers only some layers of {module.hf_module}; easytune "
                             f"adapts a module in every layer or in none.")
        kernel_shape = ad._kernel_shape(ad._get(base, module.path))
        in_dim = ad.in_features(model_config, module.path)
        out_dim = kernel_shape[-1]
        a_list, b_list, m_list = [], [], []
        for name in names:
            a, b = tensors[name + ".lora_A.weight"], tensors[name + ".lora_B.weight"]
            for tensor_name, got, want in ((name + ".lora_A.weight", a.shape, (rank, in_dim)),
                                           (name + ".lora_B.weight", b.shape, (out_dim, rank))):
                if tuple(got) != want:
                    raise ValueError(f"{directory}: {tensor_name} has shape {tuple(got)} but this base model needs "
                                     f"{want}: the adapter was made for a different base model (or rank).")
            a_list.append(a.T.astype(np.float32))
            b_list.append(b.T.astype(np.float32))
            if cfg.get("use_dora"):
                magnitude = tensors.get(name + ".lora_magnitude_vector")
                if magnitude is None or tuple(magnitude.shape) != (out_dim,):
                    raise ValueError(f"{directory}: use_dora is set but {name}.lora_magnitude_vector is missing or "
                                     f"not of shape ({out_dim},).")
                m_list.append(magnitude.astype(np.float32))
        stack = (lambda xs: np.stack(xs)) if module.stacked else (lambda xs: xs[0])
        node = {"lora_a": stack(a_list), "lora_b": stack(b_list)}
        if m_list:
            node["lora_magnitude"] = stack(m_list)
        parent = params
        for key in module.path[:-1]:
            parent = parent.setdefault(key, {})
        parent[module.path[-1]] = node
        chosen.append("/".join(module.path))
    if not chosen:
        raise ValueError(f"{directory}: the adapter holds no LoRA tensors.")
    config = ad.AdapterConfig(method="dora" if cfg.get("use_dora") else "lora", rank=rank,
                              alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout") or 0.0),
                              target_modules=tuple(sorted({m.rsplit("/", 1)[-1] for m in chosen})),
                              use_rslora=bool(cfg.get("use_rslora")), modules=tuple(chosen))
    return ad.Adapter(config, params)


def _check_saved_base_weight(key: str, saved: np.ndarray, model_config, base: dict, directory: str) -> None:
    """peft saves the base weight of an adapted embedding or output head (in case the vocabulary
    was resized); it must be the base's own, since easytune trains adapters, not base weights."""
    from easytune import hf
    name = key[len(PREFIX):].replace(".base_layer.weight", ".weight")
    for entry in hf.weight_map(model_config):
        if not entry.stacked and entry.hf_name == name:
            ours = np.asarray(jax.device_get(ad._get(base, entry.path)), np.float32)
            ours = ours.T if entry.transpose else ours
            if ours.shape == saved.shape and np.allclose(ours, saved.astype(np.float32), rtol=1e-3, atol=1e-3):
                return
            raise ValueError(f"{directory}: the adapter carries its own {name} (shape {tuple(saved.shape)}), which "
                             f"differs from this base model's (shape {ours.shape}): a resized vocabulary or another "
                             f"base model; easytune does not load trained base weights from adapters.")
    raise ValueError(f"{directory}: the adapter carries a base weight {key} easytune cannot place.")


def _load_prompt(cfg: dict, tensors: dict, model_config, directory: str) -> ad.Adapter:
    if "prompt_embeddings" not in tensors:
        raise ValueError(f"{directory}: a {cfg['peft_type']} adapter must hold prompt_embeddings.")
    embeddings = tensors["prompt_embeddings"].astype(np.float32)
    n = int(cfg["num_virtual_tokens"])
    mc = model_config
    if cfg["peft_type"] == "PREFIX_TUNING":
        want = (n, mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim)
        method, params = "prefix", {"prefix_encoder": {"embedding": embeddings}}
        encoder = "none"
    else:
        want = (n, mc.hidden_size)
        method, params = "prompt", {"prompt": {"embedding": embeddings}}
        encoder = "mlp"
    if tuple(embeddings.shape) != want:
        raise ValueError(f"{directory}: prompt_embeddings has shape {tuple(embeddings.shape)} but this base model "
                         f"needs {want}: the adapter was made for a different base model.")
    config = ad.AdapterConfig(method=method, num_virtual_tokens=n, encoder_type=encoder)
    return ad.Adapter(config, jax.tree.map(jnp.asarray, params))
