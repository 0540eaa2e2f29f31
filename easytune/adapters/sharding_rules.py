"""How adapter trees are sharded: the model family's rules, plus one rule for the leaves that LoRA,
DoRA and NF4 put beside a linear's `kernel`. Each such leaf takes its spec from the one the family's
rules give its sibling kernel, so an adapter is split like its base weight, and optimizer moments
(whose paths end in the parameter's) like the adapter. Nothing is read from the family's regexes:
the kernel's spec is looked up by matching the kernel's path, as for any parameter.
"""
from __future__ import annotations

from jax.sharding import PartitionSpec as P

from easytune import sharding

# leaf beside `kernel [in, out]` -> its spec from the kernel's `(spec_in, spec_out)`. Stacked
# leading layer axes stay unsharded (`sharding.spec_for` pads them), as for the kernel itself.
KERNEL_DERIVED_SPECS = {
    "lora_a": lambda spec_in, spec_out: P(spec_in, None),            # [in, rank]
    "lora_b": lambda spec_in, spec_out: P(None, spec_out),           # [rank, out]
    "lora_magnitude": lambda spec_in, spec_out: P(spec_out),         # [out] (DoRA)
    "nf4_codes": lambda spec_in, spec_out: P(spec_in, spec_out),     # [in / 2, out]
    "nf4_absmax": lambda spec_in, spec_out: P(spec_in, spec_out),    # [in / 64, out]
    "nf4_absmax_scale": lambda spec_in, spec_out: P(spec_in, None),  # [in / 64, ceil(out / 256)]
}
KERNEL_DERIVED_LEAF = "(^|/)(" + "|".join(KERNEL_DERIVED_SPECS) + ")$"


def spec_from_kernel(family_rules):
    """A rule spec (a function of the leaf's path, see `sharding.rule_spec`) that gives a
    `.../<module>/<leaf>` path the spec derived from the family's spec for `.../<module>/kernel`."""

    def spec(name: str) -> P:
        parent, _, leaf = name.rpartition("/")
        kernel_spec = tuple(sharding.rule_spec(f"{parent}/kernel" if parent else "kernel", family_rules))
        if len(kernel_spec) > 2:
            raise ValueError(f"the sharding rule for {parent}/kernel has rank {len(kernel_spec)}; adapter "
                             f"shardings are derived from a rule for one layer's [in, out] kernel.")
        spec_in, spec_out = (None,) * (2 - len(kernel_spec)) + kernel_spec  # a catch-all P() replicates
        return KERNEL_DERIVED_SPECS[leaf](spec_in, spec_out)

    return spec


def with_adapter_rules(family_rules) -> tuple:
    """`family_rules` preceded by the rule for adapter and NF4 leaves (derived from their kernel's)."""
    family_rules = tuple(family_rules)
    return ((KERNEL_DERIVED_LEAF, spec_from_kernel(family_rules)), *family_rules)


def rules_for(model_config) -> tuple:
    """Sharding rules for a model of `model_config`'s family with adapters attached (and for the
    adapter tree and its optimizer state on their own)."""
    from easytune import models
    return with_adapter_rules(models.family(model_config.model_type).SHARDING_RULES)


def shardings_for(tree, model_config, mesh):
    """NamedShardings on `mesh` for every leaf of `tree` (base, adapter or both) by `rules_for`."""
    return sharding.tree_shardings(tree, rules_for(model_config), mesh)
