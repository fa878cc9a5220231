"""Side-by-side benchmark: our session store vs Flask-Session vs signed cookies.

    python -m bench.run            # full run (about 6 minutes)
    python -m bench.run --quick    # a short run that CI uses to keep this script working

It starts a real redis-server and the Firestore emulator on loopback, serves each app with the
repo's gunicorn.conf.py as on Cloud Run (K_SERVICE set: no access log; 2 workers x 4 threads,
the defaults) and once more with the access log on, drives it with wrk, counts Redis commands with
INFO commandstats, and prints one table. Then the keyed state's (pyloto_corp.state) costs: round
trips and document operations per operation, and turns per second on one conversation from two
processes; and idempotency's (pyloto_corp.idempotency): round trips and document operations per
step of claim() and of an @idempotent view. Deterministic targets (store operations per request
and per operation, no google.cloud import, no lost turn) fail the run when missed; timing
targets are reported, and enforced only in a full run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis
from flask import Flask

from pyloto_corp import create_app
from pyloto_corp.config.settings import Settings
from tests import idempotency_operations, state_operations
from tests.merge_app import REQUESTS, THREADS, concurrent_writers
from tests.redis_commands import round_trips
from tests.services import (
    FirestoreEmulator,
    RedisClusterNodes,
    RedisServer,
    free_port,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
#: A strong key (production refuses a weak one), the same for every app of one run.
SECRET = secrets.token_urlsafe(48)
WRK = shutil.which("wrk") or "wrk"
SS = shutil.which("ss") or "ss"
CONNECTIONS = 16
WORKERS = 2
#: gunicorn's workers race to accept wrk's connections at the start of a run, and now and then
#: one worker wins (almost) all of them: that run measures one process instead of two, at about a
#: third of the rate, whatever the app. Such a run is detected with ss and run again.
MAX_ATTEMPTS = 5
#: The app whose read path is the reference for telemetry's cost when off (bench/apps.py).
UNTRACED = "ours_untraced"
# With --pin, the served app runs on CPU 0 and wrk on CPU 1, so the load generator does not steal
# the app's cycles at random: the comparison between apps gets much steadier.
PIN_SERVER: list[str] = []
PIN_LOAD: list[str] = []
READ = {"get": 1}  # one Firestore document read
#: The suffix of a row served with the access log on (one line per request, to /dev/null here).
ACCESS_LOG = "_accesslog"
#: Round trips per keyed-state operation on Redis (tests/test_state_costs.py pins them too).
STATE_ROUND_TRIPS = {
    "open, new entry": 2,
    "open, a key changed": 2,
    "open, a key deleted": 2,
    "open, nothing changed": 1,
    "get": 1,
    "exists": 1,
    "turn, a key changed": 2,
    "turn, nothing changed": 2,
    "delete": 1,
}
#: Round trips per idempotency step on Redis (tests/test_idempotency_costs.py pins them too).
IDEMPOTENCY_ROUND_TRIPS = {
    "claim": 1,
    "complete": 1,
    "replay": 1,
    "claim, held elsewhere": 1,
    "claim, left without complete": 2,
    "view, first request": 2,
    "view, replay": 1,
}
#: Document operations per claim, completion and replay on Firestore.
IDEMPOTENCY_DOCUMENTS = {
    "claim": {**READ, "create": 1},
    "complete": {**READ, "update": 1},
    "replay": READ,
}
#: Document operations per keyed-state load and save on Firestore.
STATE_DOCUMENTS = {
    "get": READ,
    "open, a key changed": {**READ, "set": 1},
    "open, nothing changed": READ,
}


@dataclass
class Row:
    name: str
    requests_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    store_ops: str = "-"
    in_process_us: float | None = None
    reruns: int = 0
    notes: list[str] = field(default_factory=list)


def redis_calls(clients: list[redis.Redis]) -> int:
    """Round trips, summed over the nodes (a cluster's): our session scripts' inner commands
    are not counted (see tests/redis_commands.py); Flask-Session sends none of those on a read."""
    return sum(round_trips(client) for client in clients)


def environment(
    app: str, redis_url: str, emulator: FirestoreEmulator | None, cluster_url: str = ""
) -> dict[str, str]:
    """The app's environment: the shipped gunicorn.conf.py as deployed on Cloud Run (K_SERVICE
    set, so no access log), nothing tuned but the worker count (and the port, in gunicorn()).
    An ``_accesslog`` suffix turns the access log on (GUNICORN_ACCESS_LOG=true) to show its cost."""
    inherited = ("SESSION_", "REDIS_", "ENV", "GUNICORN_", "LOG_LEVEL", "K_", "FIRESTORE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
    env.update(FLASK_SKIP_DOTENV="1", SECRET_KEY=SECRET, REDIS_URL=redis_url, K_SERVICE="bench")
    env.update(GUNICORN_WORKERS=str(WORKERS), PYTHONPATH=str(ROOT))
    if app.endswith(ACCESS_LOG):
        app = app.removesuffix(ACCESS_LOG)
        env["GUNICORN_ACCESS_LOG"] = "true"
    if app.startswith("ours"):
        backend = app.split("_", 1)[1]
        if backend == "cluster":
            backend = "redis"
            env["REDIS_URL"] = cluster_url
        # The demo login stores the user under "user": index it (log out everywhere).
        env.update(ENV="production", SESSION_STORE_BACKEND=backend, BENCH_APP="ours")
        env["SESSION_USER_KEY"] = "user"
        if backend == "firestore":
            assert emulator is not None
            env.update(FIRESTORE_EMULATOR_HOST=emulator.host, FIRESTORE_PROJECT=emulator.project)
    else:
        env["BENCH_APP"] = app
    return env


def request(port: int, method: str, cookie: str | None = None) -> tuple[int, str | None]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Cookie": cookie} if cookie else {}
        connection.request(method, "/session/counter", headers=headers)
        response = connection.getresponse()
        response.read()
        set_cookie = response.getheader("Set-Cookie")
        return response.status, set_cookie.split(";", 1)[0] if set_cookie else None
    finally:
        connection.close()


@contextmanager
def gunicorn(env: dict[str, str], app: str = "bench.apps:create()") -> Iterator[int]:
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", app]
    command = PIN_SERVER + command
    process = subprocess.Popen(  # noqa: S603 - fixed arguments
        command,
        cwd=ROOT,
        env={**env, "PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def up() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited: {process.communicate()[1]}")
        try:
            return request(port, "GET")[0] < 500
        except OSError:
            return False

    try:
        wait_until(up, 30, "gunicorn")
        yield port
    finally:
        process.terminate()
        process.wait(timeout=20)


def connections_per_worker(port: int) -> list[int]:
    """Established connections to ``port`` per server process (from ``ss -p``), fewest first."""
    output = subprocess.run(  # noqa: S603 - fixed arguments
        [SS, "-tnpH", "state", "established", f"sport = :{port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted(Counter(re.findall(r"pid=(\d+)", output)).values())


def lopsided(spread: list[int]) -> bool:
    """A worker holds under an eighth of the connections (or none): a one-process run."""
    return len(spread) < WORKERS or spread[0] < CONNECTIONS // 8


def wrk(port: int, cookie: str, seconds: float) -> tuple[float, float, float, int, list[int]]:
    """(requests/s, p50 ms, p99 ms, requests, connections per worker halfway through) for
    read-only requests carrying the cookie."""
    url = f"http://127.0.0.1:{port}/session/counter"
    command = [
        *PIN_LOAD,
        WRK,
        "-t2",
        f"-c{CONNECTIONS}",
        f"-d{seconds}s",
        "--latency",
        "-H",
        f"Cookie: {cookie}",
        url,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)  # noqa: S603
    time.sleep(seconds / 2)
    spread = connections_per_worker(port)
    output, _ = process.communicate()
    if process.returncode != 0 or "Non-2xx" in output:
        raise RuntimeError(f"wrk failed or saw errors:\n{output}")

    def latency(percent: str) -> float:
        match = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
        assert match, output
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
        return float(match.group(1)) * scale

    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    return rate, latency("50"), latency("99"), total, spread


def first_session(name: str, port: int) -> str:
    """The session every round reads. A store's first request in a fresh worker (a new
    connection, on a machine busy starting every app) may outlast its timeout and answer 503,
    after which the breaker refuses for its cooldown (1 s): that is set-up, not a measured
    request, so it is tried again, said aloud, and a store that keeps refusing stops the run."""
    for attempt in range(1, 4):
        status, cookie = request(port, "POST")
        if status == 200 and cookie:
            return cookie
        print(f"{name}: creating a session answered {status} (try {attempt} of 3)", file=sys.stderr)
        time.sleep(1.5)
    raise RuntimeError(f"{name}: creating a session answered {status} three times")


def serve_and_measure(
    envs: dict[str, dict[str, str]],
    seconds: int,
    rounds: int,
    stores: dict[str, list[redis.Redis]],
) -> tuple[dict[str, Row], dict[str, list[float]]]:
    """Serve every app at once, then run the wrk rounds interleaved (A B C ..., A B C ...), so
    a slow moment of the machine hits neighbouring measurements alike. Returns each app's row
    (its median round) and its requests/s per round, for ratios taken round by round."""
    rows = {name: Row(name) for name in envs}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in envs}
    with ExitStack() as stack:
        ports = {name: stack.enter_context(gunicorn(env)) for name, env in envs.items()}
        cookies = {}
        for name, port in ports.items():
            cookies[name] = first_session(name, port)
            wrk(port, cookies[name], 1)  # warm up both workers
        for round_ in range(1, rounds + 1):
            for name, port in ports.items():
                for _attempt in range(MAX_ATTEMPTS):
                    before = redis_calls(stores.get(name, []))
                    rate, p50, p99, total, spread = wrk(port, cookies[name], seconds)
                    if not lopsided(spread):
                        break
                    rows[name].reruns += 1
                else:
                    rows[name].notes.append(
                        f"round {round_} still lopsided after {MAX_ATTEMPTS} runs: "
                        f"connections per worker {spread}"
                    )
                if "firestore" not in name:
                    calls = redis_calls(stores.get(name, [])) - before
                    rows[name].store_ops = f"{calls / total:.2f} cmd"
                results[name].append((rate, p50, p99))
    for name, row in rows.items():
        median_round = sorted(results[name])[len(results[name]) // 2]
        row.requests_per_s, row.p50_ms, row.p99_ms = median_round
    return rows, {name: [rate for rate, _, _ in rounds_] for name, rounds_ in results.items()}


def paired_ratio(rates: dict[str, list[float]], app: str, baseline: str) -> float:
    """Median over rounds of app / baseline, each pair measured back to back."""
    return statistics.median(a / b for a, b in zip(rates[app], rates[baseline], strict=True))


def in_process_rounds(
    envs: dict[str, dict[str, str]], count: int, rounds: int
) -> dict[str, list[float]]:
    """in_process() for every app, interleaved round by round like the wrk rounds, so a slow
    moment of the machine does not land on one app's only measurement."""
    samples: dict[str, list[float]] = {name: [] for name in envs}
    for round_ in range(rounds):
        # Every other round in reverse order: no app always runs first, or after a given one.
        order = list(envs.items()) if round_ % 2 == 0 else list(reversed(envs.items()))
        for name, env in order:
            app = "ours" if name.startswith("ours") else name
            samples[name].append(in_process(app, env, count))
    return samples


def login(port: int, cookie: str) -> str:
    """Log the session in as "ana"; the new session cookie (the id is rotated)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        body = json.dumps({"user": "ana"})
        headers = {"Cookie": cookie, "Content-Type": "application/json"}
        connection.request("POST", "/session/login", body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        assert response.status == 200
        return str(response.getheader("Set-Cookie")).split(";", 1)[0]
    finally:
        connection.close()


def per_request_commands(env: dict[str, str], stores: list[redis.Redis]) -> dict[str, int]:
    """Redis round trips for: no cookie and no write; read-only; modifying; a login (the id
    rotated, the user indexed); then a read-only request of the logged-in session."""
    counts: dict[str, int] = {}
    with gunicorn(env) as port:
        _, cookie = request(port, "POST")
        for label, method, sent in (
            ("no session", "GET", None),
            ("read-only", "GET", cookie),
            ("modify", "POST", cookie),
        ):
            for store in stores:
                store.config_resetstat()
            request(port, method, sent)
            counts[label] = redis_calls(stores)
        assert cookie is not None
        login(port, cookie)  # the first login loads the index script
        anonymous = request(port, "POST")[1]
        assert anonymous is not None
        for store in stores:
            store.config_resetstat()
        logged_in = login(port, anonymous)
        counts["login"] = redis_calls(stores)
        for store in stores:
            store.config_resetstat()
        request(port, "GET", logged_in)
        counts["read-only, logged in"] = redis_calls(stores)
    return counts


def lost_updates(envs: dict[str, dict[str, str]]) -> dict[str, tuple[int, int]]:
    """Keys lost (and requests not answered 200) when THREADS clients of one session each
    write their own keys at once, through gunicorn (2 workers x 4 threads)."""
    specs = {
        "ours_redis": "tests.merge_app:ours()",
        "ours_firestore": "tests.merge_app:ours()",
        "flask_session": "tests.merge_app:flask_session_defaults()",
    }
    results: dict[str, tuple[int, int]] = {}
    for name, spec in specs.items():
        with gunicorn(envs[name], app=spec) as port:
            statuses, kept = concurrent_writers(port)
        results[name] = (THREADS * REQUESTS - kept, len(statuses) - statuses.count(200))
    return results


def firestore_operations(env: dict[str, str], seconds: float) -> dict[str, dict[str, int]]:
    """Firestore document operations for: no cookie and no write; read-only; modifying; then
    ``seconds`` of back-to-back reads of one session with a 1 s refresh interval (lazy refresh:
    about one expiry write per second however many reads). Our app, in-process, on the emulator."""
    code = f"""
import json, time
from bench.apps import create
from tests.firestore_operations import counting_document_operations
client = create().test_client()
def call(method):
    response = client.open("/session/counter", method=method, base_url="https://localhost")
    assert response.status_code == 200, response.status_code
out = {{}}
with counting_document_operations() as ops:
    for label, method in (("no session", "GET"), ("create", "POST"), ("read-only", "GET"),
                          ("modify", "POST")):
        started = time.monotonic()  # the last one, "modify", writes the expiry
        call(method)
        out[label] = dict(ops)
        ops.clear()
    requests, deadline = 0, time.monotonic() + {seconds}
    while time.monotonic() < deadline:
        call("GET")
        requests += 1
    elapsed_ms = int((time.monotonic() - started) * 1000)
    out["sustained"] = {{"requests": requests, "elapsed_ms": elapsed_ms, **ops}}
print(json.dumps(out))
"""
    result = subprocess.run(  # noqa: S603 - fixed arguments
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**env, "FIRESTORE_REFRESH_INTERVAL": "1s"},
        capture_output=True,
        text=True,
        check=True,
    )
    operations: dict[str, dict[str, int]] = json.loads(result.stdout)
    return operations


def quiet_app(env: dict[str, str]) -> Flask:
    """Our app in this process, for the keyed-state measures; its start-up advice (the default
    key prefix on Cloud Run) is not logged, as the served apps' logs are not shown either."""
    logging.disable(logging.WARNING)
    try:
        return create_app(Settings.from_env(env))
    finally:
        logging.disable(logging.NOTSET)


def state_round_trips(app: Flask, stores: list[redis.Redis]) -> dict[str, int]:
    """Redis round trips per keyed-state operation, summed over the nodes."""
    return state_operations.total(state_operations.redis_round_trips(app, stores))


def document_operations(module: str, env: dict[str, str]) -> dict[str, dict[str, int]]:
    """Firestore document operations per step of ``tests.<module>`` (keyed state, idempotency),
    in a process of its own (the emulator's client is per process)."""
    result = subprocess.run(  # noqa: S603 - fixed arguments
        [sys.executable, "-m", f"tests.{module}", "firestore"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    operations: dict[str, dict[str, int]] = json.loads(result.stdout)
    return operations


def idempotency_round_trips(app: Flask, stores: list[redis.Redis]) -> dict[str, int]:
    """Redis round trips per idempotency step, summed over the nodes."""
    return idempotency_operations.total(idempotency_operations.redis_round_trips(app, stores))


def turns_on_one_conversation(
    env: dict[str, str], app: Flask, seconds: float
) -> tuple[list[dict[str, int]], object]:
    """Two processes (two instances' workers: separate pools) each taking turn()s that
    increment one counter of one conversation, for ``seconds`` from the same moment: what each
    did, and the counter as stored at the end (read through ``app``, on the same store)."""
    conversation = f"bench-{secrets.token_hex(8)}"
    command = [sys.executable, "-m", "tests.state_operations", "turns", conversation, str(seconds)]
    processes = [
        subprocess.Popen(  # noqa: S603 - fixed arguments
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for process in processes:  # both connected before either starts
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a turn-taking process failed: {process.communicate()[1]}")
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        done = []
        for process in processes:
            output, errors = process.communicate(timeout=seconds + 60)
            if process.returncode != 0:
                raise RuntimeError(f"a turn-taking process failed: {errors}")
            done.append(json.loads(output))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    with app.app_context():
        stored = state_operations.costs.get(conversation)
    return done, (stored or {}).get(state_operations.COUNTER)


def in_process(app_name: str, env: dict[str, str], count: int) -> float:
    """Median microseconds per read-only request through Flask's test client (one process)."""
    code = f"""
import time, statistics, os
import bench.apps as apps
app = apps.create()
client = app.test_client()
client.post("/session/counter", base_url="https://localhost")
samples = []
for _ in range(3):
    started = time.perf_counter()
    for _ in range({count}):
        assert client.get("/session/counter", base_url="https://localhost").json == {{"counter": 1}}
    samples.append((time.perf_counter() - started) / {count} * 1e6)
print(statistics.median(samples))
"""
    result = subprocess.run(  # noqa: S603 - fixed arguments
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return float(result.stdout.strip())


#: Store calls a read-only request makes on Redis (the read; Redis slides expiry in it).
TRACED_CALLS_PER_READ = 1


def telemetry_off_per_call() -> float:
    """Microseconds telemetry's wrapper adds to a store call with no SDK configured: the best
    of five timings of 100,000 calls, wrapped and bare (redis imported first, as in the app:
    redis-py imports the OpenTelemetry API when it is installed)."""
    import timeit

    import redis as _redis  # noqa: F401 - the import an app does, with its side effects

    from pyloto_corp.telemetry import Telemetry

    def bare() -> None:
        return None

    wrapped = Telemetry("redis", None).traced("read", bare)
    best = [min(timeit.repeat(call, number=100_000, repeat=5)) for call in (bare, wrapped)]
    return (best[1] - best[0]) / 100_000 * 1e6


def compile_sources() -> None:
    """Bytecode first, for every app alike, as in the image (pip compiles the installed package,
    the Dockerfile compiles wsgi.py): otherwise, on a fresh checkout or with
    PYTHONDONTWRITEBYTECODE set, the first app measured would time the compiler on the repo's
    own sources."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "pyloto_corp", "wsgi.py", "bench", "tests"],
        cwd=ROOT,
        check=True,
    )


def cold_start(runs: int, *candidates: tuple[dict[str, str], str]) -> list[tuple[float, list[str]]]:
    """Per candidate (env, modules): median wall seconds of ``python -c "import MODULES"`` and the
    google modules it loaded. Runs alternate between candidates so drift hits all alike."""
    compile_sources()
    times: list[list[float]] = [[] for _ in candidates]
    google: list[list[str]] = [[] for _ in candidates]
    for _ in range(runs):
        for index, (env, module) in enumerate(candidates):
            code = f"import sys, {module}; print(','.join(m for m in sys.modules if 'google' in m))"
            started = time.perf_counter()
            result = subprocess.run(  # noqa: S603 - fixed arguments
                [sys.executable, "-c", code],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            times[index].append(time.perf_counter() - started)
            google[index] = [m for m in result.stdout.strip().split(",") if m]
    return [(statistics.median(t), g) for t, g in zip(times, google, strict=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="short run (CI)")
    parser.add_argument("--pin", action="store_true", help="app on CPU 0, wrk on CPU 1")
    args = parser.parse_args(argv)
    if args.pin:
        taskset = shutil.which("taskset") or "taskset"
        PIN_SERVER[:] = [taskset, "-c", "0"]
        PIN_LOAD[:] = [taskset, "-c", "1"]
    seconds, rounds, count, runs = (2, 2, 200, 5) if args.quick else (4, 9, 600, 25)
    compile_sources()
    if shutil.which("wrk") is None or shutil.which("ss") is None:
        raise SystemExit(
            "wrk or ss is not installed: run `make bench` (it installs Debian's wrk and iproute2)."
        )

    failures: list[str] = []
    lines: list[str] = []

    def target(ok: bool, text: str, *, timing: bool = False) -> None:
        lines.append(f"- [{'x' if ok else ' '}] {text}")
        if not ok and (not timing or not args.quick):
            failures.append(text)

    with tempfile.TemporaryDirectory() as workdir:
        server = RedisServer(Path(workdir))
        server.start()
        emulator = FirestoreEmulator()
        emulator.start()
        cluster = RedisClusterNodes(Path(workdir) / "cluster")
        cluster.start()
        store = server.client()
        nodes = [redis.Redis(port=port, socket_timeout=5) for port in cluster.ports]
        stores = {name: [store] for name in ("flask_session", "flask_session_norefresh")}
        stores |= {"ours_redis": [store], "ours_cluster": nodes}
        stores["ours_redis" + ACCESS_LOG] = [store]
        seeds = ",".join(f"127.0.0.1:{port}" for port in cluster.ports)
        try:
            env: Callable[[str], dict[str, str]] = lambda app: environment(  # noqa: E731
                app, server.url, emulator, f"redis+cluster://{seeds}"
            )
            names = ["cookie", "flask_session", "flask_session_norefresh", "ours_redis"]
            served = [*names, "ours_redis" + ACCESS_LOG, "ours_cluster", "ours_firestore"]
            rows, rates = serve_and_measure(
                {name: env(name) for name in served}, seconds, rounds, stores
            )
            documents = firestore_operations(env("ours_firestore"), seconds)
            in_process_envs = {name: env(name) for name in names}
            in_process_envs[UNTRACED] = {**env("ours_redis"), "BENCH_APP": UNTRACED}
            in_process_us = in_process_rounds(in_process_envs, count, rounds)
            for name, samples in in_process_us.items():
                if name in rows:
                    rows[name].in_process_us = statistics.median(samples)
            commands = per_request_commands(env("ours_redis"), [store])
            cluster_commands = per_request_commands(env("ours_cluster"), nodes)
            lost = lost_updates(
                {name: env(name) for name in ("ours_redis", "ours_firestore", "flask_session")}
            )
            state_app = quiet_app(env("ours_redis"))
            state_trips = state_round_trips(state_app, [store])
            state_cluster_trips = state_round_trips(quiet_app(env("ours_cluster")), nodes)
            state_docs = document_operations("state_operations", env("ours_firestore"))
            turns, counter = turns_on_one_conversation(env("ours_redis"), state_app, seconds)
            idem_trips = idempotency_round_trips(quiet_app(env("ours_redis")), [store])
            idem_cluster_trips = idempotency_round_trips(quiet_app(env("ours_cluster")), nodes)
            idem_docs = document_operations("idempotency_operations", env("ours_firestore"))
            (ours_cold, google), (base_cold, _), (environs_cold, _) = cold_start(
                runs,
                (env("ours_redis"), "wsgi"),
                (env("flask_session"), "bench.minimal_app"),
                # Attribution: the minimal app plus the one required dependency it lacks.
                (env("flask_session"), "environs, bench.minimal_app"),
            )
        finally:
            store.close()
            for node in nodes:
                node.close()
            cluster.stop()
            emulator.stop()
            server.stop()

    sustained = documents["sustained"]
    rows["ours_firestore"].store_ops = (
        f"{sustained.get('get', 0) / sustained['requests']:.2f} read + "
        f"{sustained.get('update', 0) / sustained['requests']:.3f} write"
    )
    vs_limit = paired_ratio(rates, "ours_redis", "flask_session_norefresh")
    vs_defaults = paired_ratio(rates, "ours_redis", "flask_session")
    access_log = paired_ratio(rates, "ours_redis" + ACCESS_LOG, "ours_redis")
    pinned = "; app pinned to CPU 0, wrk to CPU 1" if args.pin else ""
    setup = f"wrk -t2 -c16, {seconds}s x {rounds}; gunicorn 2x4{pinned}"
    print(f"Machine: {os.cpu_count()} cores; {setup}")
    print()
    print("| app | req/s | p50 ms | p99 ms | store ops / read | in-process µs | vs cookie |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for row in rows.values():
        in_proc = f"{row.in_process_us:.0f}" if row.in_process_us else "-"
        ratio = paired_ratio(rates, row.name, "cookie")
        print(
            f"| {row.name} | {row.requests_per_s:,.0f} | {row.p50_ms:.2f} | {row.p99_ms:.2f} "
            f"| {row.store_ops} | {in_proc} | {ratio:.2f}x |"
        )
    print()
    print(
        "req/s, latencies and in-process µs: each app's median round (rounds interleaved across "
        "apps); ratios: median of round-by-round ratios"
    )
    print(
        f"Runs redone because one worker held under 1/8 of wrk's {CONNECTIONS} connections: "
        + json.dumps({row.name: row.reruns for row in rows.values()})
    )
    for row in rows.values():
        for note in row.notes:
            print(f"{row.name}: {note}")
    for app, baseline in (
        ("ours_redis", "flask_session_norefresh"),
        ("ours_redis", "flask_session"),
    ):
        pairs = " ".join(f"{a / b:.2f}" for a, b in zip(rates[app], rates[baseline], strict=True))
        print(f"{app} / {baseline}, round by round: {pairs}")
    pairs = " ".join(
        f"{a / b:.2f}"
        for a, b in zip(rates["ours_redis" + ACCESS_LOG], rates["ours_redis"], strict=True)
    )
    print(
        f"Access log on (GUNICORN_ACCESS_LOG=true; every row runs as on Cloud Run, where it is "
        f"off): {access_log:.2f}x ours_redis ({(1 - access_log) * 100:.0f} % fewer req/s; "
        f"round by round: {pairs})"
    )
    print(f"Redis round trips per request (ours): {json.dumps(commands)}")
    print(
        "Redis Cluster (3 primaries) round trips per request, summed over the nodes (ours): "
        + json.dumps(cluster_commands)
    )
    print(
        f"Concurrent writers, keys lost ({THREADS} clients of one session x {REQUESTS} requests, "
        "each writing its own key, 20 ms inside the view): "
        + ", ".join(
            f"{name} {keys}/{THREADS * REQUESTS} lost ({failed} not 200)"
            for name, (keys, failed) in lost.items()
        )
    )
    per_request = {label: documents[label] for label in ("no session", "read-only", "modify")}
    print(f"Firestore document operations per request (ours): {json.dumps(per_request)}")
    reads, writes = sustained.get("get", 0), sustained.get("update", 0)
    print(
        f"Firestore, {seconds} s of back-to-back reads of one session, refresh interval 1 s: "
        f"{sustained['requests']} requests, {reads} document reads, {writes} expiry writes"
    )
    print(f"Keyed state, Redis round trips per operation: {json.dumps(state_trips)}")
    print(
        "Keyed state, Redis Cluster (3 primaries) round trips per operation, summed over the "
        f"nodes: {json.dumps(state_cluster_trips)}"
    )
    print(f"Keyed state, Firestore document operations per operation: {json.dumps(state_docs)}")
    turns_done = sum(process["turns"] for process in turns)
    print(
        f"Keyed state, turns per second on one conversation (2 processes x turn() incrementing "
        f"one counter, redis-server, {seconds} s): {turns_done / seconds:,.0f} turns/s ("
        + " + ".join(str(process["turns"]) for process in turns)
        + f" turns, {sum(process['busy'] for process in turns)} StateBusy); final counter "
        f"{counter}, turns done {turns_done}"
    )
    print(f"Idempotency, Redis round trips per step: {json.dumps(idem_trips)}")
    print(
        "Idempotency, Redis Cluster (3 primaries) round trips per step, summed over the nodes: "
        + json.dumps(idem_cluster_trips)
    )
    print(f"Idempotency, Firestore document operations per step: {json.dumps(idem_docs)}")
    print(
        f"Cold start `import wsgi` (redis): {ours_cold * 1000:.0f} ms; minimal Flask + "
        f"Flask-Session: {base_cold * 1000:.0f} ms; the minimal app + `import environs` alone: "
        f"{environs_cold * 1000:.0f} ms ({environs_cold / base_cold:.2f}x); "
        f"google modules imported: {len(google)}"
    )
    print()
    target(
        {k: commands[k] for k in ("no session", "read-only", "modify", "read-only, logged in")}
        == {"no session": 0, "read-only": 1, "modify": 2, "read-only, logged in": 2},
        "Redis: 0 commands without a session, 1 per read (2 logged in: GETEX and the user's "
        "revocation mark, pipelined in one round trip once the worker knows the session), 2 per "
        f"modification; a login {commands['login']} (read, new id, old id deleted, user index)",
    )
    target(
        {k: cluster_commands[k] for k in ("no session", "read-only", "modify")}
        == {"no session": 0, "read-only": 1, "modify": 2},
        "Redis Cluster: the same, summed over the primaries",
    )
    target(
        lost["ours_redis"] == lost["ours_firestore"] == (0, 0),
        "concurrent writers: 0 keys lost and every request 200 (ours, redis and firestore)",
    )
    target(
        per_request == {"no session": {}, "read-only": READ, "modify": {**READ, "update": 1}},
        "Firestore: 0 operations without a session, 1 read per read, 1 read + 1 write per change",
    )
    target(
        reads == sustained["requests"]
        and 1 <= writes <= sustained["elapsed_ms"] // 1000
        and set(sustained) <= {"requests", "elapsed_ms", "get", "update"},
        f"Firestore expiry written {writes} times over {sustained['requests']} reads in "
        f"{sustained['elapsed_ms'] / 1000:.1f} s since the change (at most once per 1 s "
        "refresh interval)",
    )
    target(
        state_trips == STATE_ROUND_TRIPS,
        "Keyed state on Redis: get 1, exists 1, delete 1; open() 1 to load + 1 to save a change "
        "(1 when nothing changed); turn() 2 (<= 3), changed or not",
    )
    target(
        state_cluster_trips == STATE_ROUND_TRIPS,
        "Keyed state on Redis Cluster: the same, summed over the primaries",
    )
    target(
        {label: state_docs[label] for label in STATE_DOCUMENTS} == STATE_DOCUMENTS,
        "Keyed state on Firestore: 1 read per load; 1 read + 1 write per open() setting a key; "
        "1 read for an open() that changes nothing",
    )
    target(
        counter == turns_done > 0,
        f"Keyed state, two processes taking turns on one conversation: final counter {counter} "
        f"= {turns_done} turns done (0 lost)",
    )
    target(
        idem_trips == IDEMPOTENCY_ROUND_TRIPS,
        "Idempotency on Redis: claim 1, complete 1, replay 1 (a claim held elsewhere 1, a release "
        "1); an @idempotent view's first request 2, its replay 1",
    )
    target(
        idem_cluster_trips == IDEMPOTENCY_ROUND_TRIPS,
        "Idempotency on Redis Cluster: the same, summed over the primaries",
    )
    target(
        {label: idem_docs[label] for label in IDEMPOTENCY_DOCUMENTS} == IDEMPOTENCY_DOCUMENTS,
        "Idempotency on Firestore: claim 1 read + 1 create, complete 1 read + 1 write, replay "
        "1 read",
    )
    target(not google, "redis backend imports no google.cloud module")
    target(
        ours_cold <= 1.2 * base_cold,
        f"cold start {ours_cold / base_cold:.2f}x the minimal app (<= 1.2x)",
        timing=True,
    )
    target(
        vs_limit >= 0.97,
        f"{vs_limit:.2f}x the one-round-trip limit (>= 0.97x)",
        timing=True,
    )
    target(
        vs_defaults >= 1.25,
        f"{vs_defaults:.2f}x Flask-Session defaults under gunicorn (>= 1.25x)",
        timing=True,
    )
    telemetry_off = paired_ratio(in_process_us, "ours_redis", UNTRACED)
    per_call_us = telemetry_off_per_call()
    read_us = statistics.median(in_process_us["ours_redis"])
    share = 100 * per_call_us * TRACED_CALLS_PER_READ / read_us
    print(
        f"Telemetry off (OpenTelemetry API, no SDK): +{per_call_us * 1000:.0f} ns per store call "
        f"(the wrapper vs the bare method), {TRACED_CALLS_PER_READ} call per read-only request "
        f"of {read_us:.0f} us: +{share:.2f} %; the whole apps, paired: {telemetry_off:.3f}x "
        f"({read_us:.0f} vs {statistics.median(in_process_us[UNTRACED]):.0f} us per request, "
        f"median of {len(in_process_us[UNTRACED])} rounds: within their round-to-round noise)"
    )
    target(
        share <= 2,
        f"telemetry off costs +{share:.2f} % on the read path (<= 2 %)",
        timing=True,
    )
    in_process_vs_defaults = paired_ratio(in_process_us, "flask_session", "ours_redis")
    target(
        in_process_vs_defaults >= 1.4,
        f"{in_process_vs_defaults:.2f}x Flask-Session defaults in-process (>= 1.4x)",
        timing=True,
    )
    print("\n".join(lines))
    if failures:
        print(f"\n{len(failures)} target(s) missed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
