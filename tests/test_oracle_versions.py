"""The tests compare against reference implementations (transformers, peft, trl, accelerate,
bitsandbytes, torch, lm_eval) at the exact versions pinned in the `test` extra. A venv with other versions
tests something else (transformers 5.24 changed peft's cached generation, for one), so it fails
here, by name, instead of as a puzzling parity failure somewhere else."""
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version


def test_installed_oracles_are_the_pinned_versions():
    pinned = {}
    for line in metadata.requires("easytune") or []:
        requirement = Requirement(line)
        if requirement.marker is not None and requirement.marker.evaluate({"extra": "test"}) \
                and not requirement.marker.evaluate({"extra": ""}):
            exact = [spec.version for spec in requirement.specifier if spec.operator == "=="]
            if exact:
                pinned[requirement.name] = exact[0]
    assert {"torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "lm_eval"} <= pinned.keys(), pinned
    wrong = {name: (metadata.version(name), version) for name, version in pinned.items()
             if Version(metadata.version(name)).base_version != Version(version).base_version}
    assert not wrong, ("installed != pinned (reinstall with pip install -e '.[test]'): "
                       + ", ".join(f"{name} {have} != {want}" for name, (have, want) in wrong.items()))
