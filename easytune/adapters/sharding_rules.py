"""How adapter trees are sharded: the model family's rules plus rules for the leaves that LoRA,
DoRA and NF4 put beside a linear's `kernel`, so an adapter is split like its base weight."""
from __future__ import annotations

from jax.sharding import PartitionSpec as P

from easytune import sharding


def extend_rules(rules) -> tuple:
    """The family's sharding rules plus rules for adapter and NF4 leaves, derived from each
    kernel's rule, so adapters are sharded consistently with their base weights: `lora_a [in, r]`
    like the kernel's input dim, `lora_b [r, out]` and the DoRA magnitude like its output dim."""
    out = []
    for pattern, spec in rules:
        if pattern.endswith("kernel$"):
            stem, (spec_in, spec_out) = pattern[: -len("kernel$")], tuple(spec)
            out += [(stem + "lora_a$", P(spec_in, None)), (stem + "lora_b$", P(None, spec_out)),
                    (stem + "lora_magnitude$", P(spec_out)),
                    (stem + "nf4_(codes|absmax)$", spec), (stem + "nf4_absmax_scale$", P(spec_in, None))]
        out.append((pattern, spec))
    return tuple(out)


def rules_for(model_config) -> tuple:
    from easytune import models
    return extend_rules(models.family(model_config.model_type).SHARDING_RULES)


def shardings_for(tree, model_config, mesh):
    return sharding.tree_shardings(tree, rules_for(model_config), mesh)
