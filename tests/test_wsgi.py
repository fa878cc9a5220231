"""wsgi.py through the real ``flask`` CLI, as an operator runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import SECRET

ROOT = Path(__file__).resolve().parents[1]


def _flask(*args: str, **environ: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ENV", "SESSION_STORE_BACKEND")}
    env.update(FLASK_SKIP_DOTENV="1", **environ)
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_memory_in_production_exits_with_one_clear_error() -> None:
    result = _flask("routes", ENV="production", SESSION_STORE_BACKEND="memory", SECRET_KEY=SECRET)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("Error: Invalid configuration for environment 'production'")
    assert "SESSION_STORE_BACKEND=memory is refused in production" in result.stderr
    assert SECRET not in result.stderr + result.stdout


def test_development_with_memory_loads_the_app() -> None:
    result = _flask("routes", ENV="development")
    assert result.returncode == 0, result.stderr
    assert "/healthz" in result.stdout
    assert "/session/counter" in result.stdout
