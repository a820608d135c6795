"""Load benchmark of the labeling app: concurrent simulated labelers over HTTP.

Starts ``rlhf label serve`` in a subprocess on a fresh SQLite database (WAL,
synchronous=FULL), then runs ``--labelers`` threads on loopback, each with its
own logged-in client, each casting at most ``ceil(votes / labelers)`` votes
(bounded loops, no think time: the worst case). The client (``--client``) is
:class:`DirectClient`, which calls the app as its page does, or
``gradio_client.Client``, which always goes through Gradio's queue and adds up
to 50 ms of polling per call.
Every call of ``/vote`` returns the next task, so its latency is the vote ->
next task latency. Afterwards the database is checked: every
acknowledged vote is stored exactly once.

    python bench/label_load.py --labelers 32 --votes 2000 [--think 1.0] [--backend postgresql] [--replicas 2]
        [--client gradio_client]

``--backend postgresql`` runs the same on a throwaway PostgreSQL cluster (``initdb`` in a temp folder, Debian's
server binaries, durable defaults: fsync and synchronous commits on) on the same 2 cores. ``--replicas N``
(PostgreSQL) starts N ``rlhf label serve`` processes on N ports over that one database, and labeler i votes
through replica i mod N, as behind a load balancer with sticky sessions; the check then also counts
assignments handed out twice (one labeler given one comparison twice) and comparisons voted on by more
labelers than the overlap.

Target: p95 <= 100 ms with 32 labelers at 0.5-1.5 s think time on 2 CPU cores. The record (command,
machine, load before and after, date, figures) goes to bench/results/label_load_think<T>.json
(label_load_saturation.json without think time; ``--record`` to change).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_record import Record  # noqa: E402

from feedback_ui.testing import PASSWORD, make_project  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: str, port: int, concurrency: int) -> subprocess.Popen:
    """``rlhf label serve`` as a child process; returns once the login page answers."""
    cmd = [sys.executable, "-m", "rlhf.cli", "label", "serve", "--db", db, "--port", str(port),
           "--concurrency", str(concurrency)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def connect(url: str, names: list[str], parallel: int = 4, attempts: int = 3, client: str = "gradio_client"):
    """One logged-in client per labeler (``parallel`` logins at a time, each tried up to ``attempts`` times):
    ``gradio_client.Client`` or :class:`DirectClient` (``client="direct"``).

    Logging in is not what the benchmark measures; on a busy machine 32 logins at once (each a slow
    password hash on the server) run into the HTTP client's 5 s timeout, hence the limit and the retries.
    """
    from gradio_client import Client

    clients: dict[str, object] = {}
    failures: dict[str, str] = {}
    gate = threading.Semaphore(parallel)

    def make(name):
        with gate:
            for attempt in range(attempts):
                try:
                    # plain http on loopback: ssl_verify=False only stops gradio_client from building a TLS
                    # context (CA bundle load, ~60 ms CPU) for every request; nothing is encrypted either way
                    clients[name] = DirectClient(url, name, PASSWORD) if client == "direct" else Client(
                        url, auth=(name, PASSWORD), verbose=False, download_files=False, ssl_verify=False)
                    return
                except Exception as exc:
                    failures[name] = repr(exc)[:200]

    threads = [threading.Thread(target=make, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    missing = [n for n in names if n not in clients]
    if missing:
        raise RuntimeError(f"{len(missing)} labelers could not log in, e.g. {missing[0]}: {failures[missing[0]]}")
    return [clients[n] for n in names]


class DirectClient:
    """A labeler calling the app over one keep-alive HTTP connection as the app's page does.

    An endpoint off Gradio's queue (``queue: false`` in the app's config, as the app's own are) is one
    ``POST /gradio_api/run/<name>`` answered on itself. One on the queue is ``POST /gradio_api/queue/join``,
    then ``GET /gradio_api/queue/data``, which streams the event's messages (Server-Sent Events) and ends
    after ``process_completed``; the answer is read the moment it arrives. gradio_client reads the same
    stream in a thread and polls what that thread received every 50 ms
    (``gradio_client.utils.stream_sse_v1plus``), which adds 0–50 ms per call that no browser has.
    Offers what the benchmark uses of ``gradio_client.Client``: ``predict``, ``submit(...).result()``, ``close``.
    """

    def __init__(self, url: str, name: str, password: str, timeout: float = 30.0):
        self.http = httpx.Client(base_url=url, timeout=timeout)
        login = self.http.post("login", data={"username": name, "password": password},
                               headers={"accept": "application/json"})  # fmt: skip
        if login.status_code != 200:
            self.http.close()
            raise RuntimeError(f"login of {name} failed: HTTP {login.status_code} {login.text[:200]}")
        self.session_hash = uuid.uuid4().hex
        info = self.http.get("gradio_api/info").raise_for_status().json()["named_endpoints"]
        config = self.http.get("config").raise_for_status().json()
        self.endpoints = {}  # api name -> (fn_index, default of every parameter, off the queue)
        for i, dep in enumerate(config["dependencies"]):
            api = f"/{dep.get('api_name')}"
            if dep.get("api_name") and api in info:
                params = info[api]["parameters"]
                self.endpoints[api] = (dep.get("id", i), [p.get("parameter_default") for p in params],
                                       dep.get("queue") is False)

    def predict(self, *data, api_name: str):
        fn_index, defaults, direct = self.endpoints[api_name]
        payload = {"data": [*data, *defaults[len(data):]], "fn_index": fn_index, "event_data": None,
                   "trigger_id": None, "session_hash": self.session_hash}  # fmt: skip
        if direct:
            answer = self.http.post(f"gradio_api/run{api_name}", json=payload)
            if answer.status_code != 200:
                raise RuntimeError(f"{api_name} failed: HTTP {answer.status_code} {answer.text[:200]}")
            return answer.json()["data"][0]
        event_id = self.http.post("gradio_api/queue/join", json=payload).raise_for_status().json()["event_id"]
        with self.http.stream("GET", "gradio_api/queue/data", params={"session_hash": self.session_hash}) as stream:
            stream.raise_for_status()
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("event_id") != event_id or message.get("msg") != "process_completed":
                    continue
                output = message.get("output") or {}
                if not message.get("success", True) or "data" not in output:
                    raise RuntimeError(f"{api_name} failed: {str(output.get('error', output))[:200]}")
                return output["data"][0]
        raise RuntimeError(f"{api_name}: the event stream ended without an answer")

    def submit(self, *data, api_name: str) -> concurrent.futures.Future:
        """The call, made now; a finished future (the benchmark waits for every answer anyway)."""
        future = concurrent.futures.Future()
        try:
            future.set_result(self.predict(*data, api_name=api_name))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def close(self) -> None:
        self.http.close()


def stop_server(proc: subprocess.Popen, grace: float = 60) -> None:
    """SIGTERM, then SIGKILL if the server has not exited after ``grace`` seconds (slow on a busy machine)."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def labeler_loop(client, max_votes: int, acked: list, latencies: list, errors: list, stop: threading.Event,
                 think: float = 0.0, seed: int = 0, retries: int = 2):  # fmt: skip
    """Read for ``think`` s (uniform 0.5x-1.5x), vote A/B/tie in turn; until ``max_votes``, an empty queue
    or ``stop``. Records acknowledged tokens and vote -> next task latencies."""
    rng = random.Random(seed)
    phase = "next_task"
    try:
        for attempt in range(retries + 1):  # reading the first task changes nothing: safe to retry
            try:
                task = client.predict(api_name="/next_task")
                break
            except Exception as exc:
                if attempt == retries:
                    raise
                errors.append(f"retried: next_task {exc!r}"[:200])
        phase = "vote"
        for i in range(max_votes):
            if think:
                stop.wait(think * rng.uniform(0.5, 1.5))
            if not task["token"] or stop.is_set():
                return
            choice = ("A", "B", "tie")[i % 3]
            t0 = time.perf_counter()
            for attempt in range(retries + 1):  # a lost answer is retried with the same token (idempotent)
                try:
                    nxt = client.submit(task["token"], choice, api_name="/vote").result(timeout=30)
                    break
                except Exception as exc:
                    if attempt == retries:
                        raise
                    errors.append(f"retried: vote {exc!r}"[:200])
            latencies.append(time.perf_counter() - t0)
            acked.append(task["token"])
            task = nxt
    except Exception as exc:  # reported by the caller (the crash bench expects these)
        errors.append(f"{phase}: {exc!r}"[:200])


@contextmanager
def bench_database(backend: str, name: str):
    """(database file or URL, description) of a fresh database on ``backend``; a PostgreSQL cluster is
    started for it and deleted afterwards."""
    if backend == "sqlite":
        yield str(Path(tempfile.mkdtemp(prefix=f"{name}_")) / f"{name}.db"), "SQLite, WAL, synchronous=FULL"
        return
    from feedback_ui.pg_cluster import PostgresCluster, find_postgres_bin

    bindir = find_postgres_bin()
    if bindir is None:
        raise SystemExit("error: PostgreSQL server binaries not found (apt-get install -y postgresql)")
    cluster = PostgresCluster(bindir, durable=True).start()
    try:
        version = subprocess.run([str(bindir / "pg_ctl"), "--version"], capture_output=True, text=True).stdout.strip()
        yield cluster.new_database(), f"{version}, throwaway cluster on loopback, durable defaults (fsync, synchronous_commit on)"
    finally:
        cluster.stop()


@contextmanager
def _connection(db: str):
    """A connection to the benchmark's database (SQLite file or PostgreSQL URL, autocommit)."""
    if not db.startswith("postgresql"):
        con = sqlite3.connect(db)
        try:
            yield con
        finally:
            con.close()
        return
    import psycopg

    with psycopg.connect(db, autocommit=True) as con:
        yield con


def _stored_keys_and_integrity(db: str) -> tuple[list[str], str]:
    with _connection(db) as con:
        keys = [k for (k,) in con.execute("SELECT idempotency_key FROM votes")]
        if not db.startswith("postgresql"):
            return keys, con.execute("PRAGMA integrity_check").fetchone()[0]
        import psycopg

        con.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
        indexes = con.execute(
            "SELECT c.relname, c.oid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_am a ON a.oid = c.relam WHERE a.amname = 'btree' AND c.relnamespace = 'public'::regnamespace"
        ).fetchall()
        try:  # every index consistent, and every heap row present in it (amcheck's bt_index_check)
            for _, oid in indexes:
                con.execute("SELECT bt_index_check(%s, true)", (oid,))
        except psycopg.Error as exc:
            return keys, f"amcheck: {exc}".splitlines()[0]
    return keys, "ok"


def _assignment_counts(db: str, overlap: int) -> tuple[int, int]:
    """(assignments of one comparison to one labeler beyond the first, comparisons with more than ``overlap`` votes)."""
    twice = ("SELECT COUNT(*) FROM (SELECT comparison_id, user_id FROM assignments GROUP BY comparison_id, user_id "
             "HAVING COUNT(*) > 1) t")
    over = f"SELECT COUNT(*) FROM (SELECT comparison_id FROM votes GROUP BY comparison_id HAVING COUNT(*) > {int(overlap)}) t"
    with _connection(db) as con:
        return con.execute(twice).fetchone()[0], con.execute(over).fetchone()[0]


def check_db(db: str, acked: list[str], overlap: int | None = None) -> dict:
    keys, integrity = _stored_keys_and_integrity(db)
    stored = set(keys)
    out = {
        "votes_in_db": len(keys),
        "duplicates_in_db": len(keys) - len(stored),
        "acknowledged": len(acked),
        "acknowledged_missing": sum(t not in stored for t in acked),
        "integrity_check": integrity,
    }
    if overlap is not None:
        out["assignments_given_twice"], out["comparisons_over_overlap"] = _assignment_counts(db, overlap)
    return out


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a running process (its threads included), from /proc; None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def servers_cpu_s(servers: list) -> float | None:
    """CPU seconds of every server process together (None when one is not measurable)."""
    values = [process_cpu_s(proc.pid) for proc, _ in servers]
    return None if None in values else sum(values)


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


TRANSPORTS = {
    "direct": "as the app's page calls it, over loopback (httpx, keep-alive): one POST per call to an endpoint "
              "off the queue, queue join + event stream read as it arrives otherwise",
    "gradio_client": "gradio_client over loopback (polls received messages every 50 ms)",
}


def default_record(think: float) -> str:
    return "label_load_saturation" if not think else f"label_load_think{think:g}"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labelers", type=int, default=32)
    ap.add_argument("--votes", type=int, default=2000, help="total votes (each labeler casts votes/labelers)")
    ap.add_argument("--overlap", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16, help="server --concurrency")
    ap.add_argument("--think", type=float, default=0.0, help="mean seconds a labeler reads before voting (0 = none)")
    ap.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--replicas", type=int, default=1, help="server processes over the one database (PostgreSQL)")
    ap.add_argument("--client", choices=["direct", "gradio_client"], default="direct",
                    help="direct: Gradio's queue protocol on a keep-alive connection, answers read as they arrive "
                         "(as the page does); gradio_client: its Client, which polls for answers every 50 ms")
    ap.add_argument("--json", default=None, help="write the summary here")
    ap.add_argument("--record", default=None,
                    help="record file (default bench/results/label_load_think<T>.json, label_load_saturation.json)")
    args = ap.parse_args(argv)
    if args.replicas < 1 or (args.replicas > 1 and args.backend != "postgresql"):
        ap.error("--replicas N > 1 needs --backend postgresql (replicas share one database server)")
    suffix = ("" if args.backend == "sqlite" else "_postgresql") + (f"_{args.replicas}replicas" if args.replicas > 1 else "")
    record = Record(default_record(args.think) + suffix, argv, path=args.record)
    with bench_database(args.backend, "label_load") as (db, database):
        summary = run_load(args, db)
    print(json.dumps(summary, indent=2))
    errors = summary.pop("first_errors")
    settings = {k: summary[k] for k in ("labelers", "overlap", "server_concurrency", "think_s", "replicas")}
    settings.update(votes=args.votes, votes_per_labeler=math.ceil(args.votes / args.labelers),
                    transport=TRANSPORTS[args.client], database=database, **library_versions())
    record.write({k: v for k, v in summary.items() if k not in settings}, settings, first_errors=errors)
    if errors:
        print("first errors:", errors, file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


def run_load(args, db: str) -> dict:
    """Serve ``db``, let the labelers vote, check the database; the summary."""
    per_labeler = math.ceil(args.votes / args.labelers)
    names = [f"labeler{i:02d}" for i in range(args.labelers)]
    n_pairs = math.ceil(per_labeler * args.labelers / args.overlap) + args.labelers
    make_project(db, {n: "labeler" for n in names}, n_pairs=n_pairs, overlap=args.overlap).close()
    servers = []
    try:
        for _ in range(args.replicas):
            port = free_port()
            servers.append((start_server(db, port, args.concurrency), f"http://127.0.0.1:{port}/"))
        clients = []
        for r, (_, url) in enumerate(servers):  # labeler i on replica i mod N
            clients += connect(url, names[r:: args.replicas], client=args.client)
        acked, latencies, errors, stop = [], [], [], threading.Event()
        threads = [
            threading.Thread(target=labeler_loop, args=(c, per_labeler, acked, latencies, errors, stop, args.think, i))
            for i, c in enumerate(clients)
        ]
        server_cpu0, client_cpu0 = servers_cpu_s(servers), own_cpu_s()
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        server_cpu1, client_cpu1 = servers_cpu_s(servers), own_cpu_s()
        for c in clients:
            c.close()
    finally:
        for proc, _ in servers:
            stop_server(proc)
    summary = {
        "labelers": args.labelers,
        "overlap": args.overlap,
        "server_concurrency": args.concurrency,
        "think_s": args.think,
        "replicas": args.replicas,
        "votes_per_s": round(len(acked) / wall, 1),
        "latency_p50_ms": round(1000 * statistics.median(latencies), 1),
        "latency_p95_ms": round(1000 * pct(latencies, 0.95), 1),
        "latency_max_ms": round(1000 * max(latencies), 1),
        "wall_s": round(wall, 1),
        "retried": sum(e.startswith("retried") for e in errors),
        "failed_labelers": sum(not e.startswith("retried") for e in errors),
        **check_db(db, acked, args.overlap),
        "server_cpu_ms_per_vote": per_vote_ms(server_cpu0, server_cpu1, len(acked)),
        "clients_cpu_ms_per_vote": per_vote_ms(client_cpu0, client_cpu1, len(acked)),
        "first_errors": errors[:3],
    }
    return summary


def per_vote_ms(cpu0: float | None, cpu1: float | None, votes: int) -> float | None:
    """CPU milliseconds per acknowledged vote over the load window (None when not measurable)."""
    if cpu0 is None or cpu1 is None or not votes:
        return None
    return round(1000 * (cpu1 - cpu0) / votes, 1)


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("gradio", "gradio_client"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


if __name__ == "__main__":
    main()
