"""The installed packages are exactly those requirements-lock.txt pins: the versions every result of the suite and
of the sweeps was proven with (a newer transformers is tried on purpose: README, "Tests")."""

from __future__ import annotations

from conftest import installed_version, locked_versions


def plain(release: str) -> str:
    """A version without its local tag: torch's CPU wheel is 2.13.0+cpu, PyPI's CUDA build of it 2.13.0."""
    return release.split("+")[0]


def test_every_locked_package_is_installed_at_its_locked_version():
    pins = locked_versions()
    assert {"torch", "deepspeed", "transformers", "peft", "numpy", "huggingface_hub", "tokenizers",
            "safetensors"} <= set(pins), sorted(pins)
    wrong = {name: (installed_version(name), pin) for name, pin in pins.items()
             if plain(installed_version(name) or "not installed") != pin}
    assert not wrong, ("installed, locked: " + ", ".join(f"{n} {got} != {want}" for n, (got, want) in wrong.items())
                       + "; `make clean test` installs requirements-lock.txt")


def test_the_library_ranges_admit_the_locked_versions():
    """pyproject.toml's ranges (what `pip install hybrid_ds` resolves) contain every locked version of its
    dependencies, so the lock is one of the environments a user may get."""
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    pins = {name.lower().replace("_", "-"): v for name, v in locked_versions().items()}
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    for requirement in requirements:
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{requirement} is not in requirements-lock.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (str(requirement), pins[name])
