"""The install pins agree with the package's own requirements and with the README's set-up."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, Version]:
    pins = {}
    for number, line in enumerate((REPO / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"constraints.txt:{number}: {line!r} is not an exact pin"
        pins[canonicalize_name(requirement.name)] = Version(spec.version)
    return pins


def test_every_pin_satisfies_the_declared_requirement():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {canonicalize_name(Requirement(r).name): Requirement(r)
                for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    pins = _pins()
    assert {"torch", "diffusers", "transformers", "peft"} <= pins.keys()
    for name, version in pins.items():
        if name in declared:  # pins of transitive packages have no declared range
            assert declared[name].specifier.contains(version, prereleases=True), \
                f"constraints.txt pins {name}=={version}, outside pyproject's {declared[name]}"


def test_readme_installs_the_pinned_torch_first():
    readme = (REPO / "README.md").read_text()
    setup = readme.split("<!-- ci:setup -->", 1)[1].split("```", 2)[1]
    first = setup.strip().splitlines()[1]  # after the ```bash line
    match = re.fullmatch(r"python -m pip install torch==(\S+)", first.strip())
    assert match, f"the README's set-up must install the pinned torch first, not {first!r}"
    assert Version(match.group(1)) == _pins()["torch"]
    assert "-c constraints.txt" in setup
