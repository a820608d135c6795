"""Crash benchmark of the labeling app: kill -9 the server mid-load, restart, lose nothing acknowledged.

Each cycle starts ``rlhf label serve`` on the same SQLite database, runs
``--labelers`` labelers without think time (``--client``: as the app's page
calls it, or gradio_client), sends SIGKILL to the server once ``--kill_after``
votes have been acknowledged, then checks the database file: ``PRAGMA
integrity_check`` is ok, every acknowledged vote is there, none is stored twice.
After the restart each labeler re-sends the vote that was in flight when the
server died (same token): it is stored once, whether or not it had been
committed before the kill.

    python bench/label_crash.py --cycles 3 [--backend postgresql]

With ``--backend postgresql`` the app serves a throwaway PostgreSQL cluster (durable defaults); only the app
server is killed, the database server keeps running, and the integrity check is amcheck's on every index.

The record (command, machine, load before and after, date, figures) goes to
bench/results/label_crash.json (``--record`` to change).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_record import Record
from label_load import (TRANSPORTS, bench_database, check_db, connect, free_port, library_versions, start_server,
                        stop_server)

from feedback_ui.testing import make_project


def run_until_killed(url: str, names: list[str], kill_after: int, server, acked: list, transport: str) -> dict:
    """Labelers vote until the server is killed; returns each labeler's in-flight token."""
    clients = connect(url, names, client=transport)
    in_flight: dict[str, str] = {}
    lock, killed = threading.Lock(), threading.Event()

    def loop(name, client):
        try:
            task = client.predict(api_name="/next_task")
            while task["token"] and not killed.is_set():
                in_flight[name] = task["token"]
                nxt = client.submit(task["token"], "A", api_name="/vote").result(timeout=15)
                with lock:
                    acked.append(task["token"])  # the UI would show the next task now
                    in_flight.pop(name, None)
                    if len(acked) >= kill_after and not killed.is_set():
                        server.kill()  # SIGKILL, mid-load: other labelers have votes in flight
                        killed.set()
                task = nxt
        except Exception:
            pass  # the server is gone

    threads = [threading.Thread(target=loop, args=(n, c)) for n, c in zip(names, clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    server.wait(timeout=10)
    for c in clients:
        try:
            c.close()
        except Exception:
            pass
    return dict(in_flight)


def resend(url: str, in_flight: dict[str, str], acked: list, transport: str) -> dict:
    """After the restart: re-send each in-flight vote with its original token."""
    statuses: dict[str, int] = {}
    clients = connect(url, list(in_flight), client=transport)
    for (name, token), client in zip(in_flight.items(), clients):
        try:
            status = client.predict(token, "A", api_name="/vote")["status"]
        except Exception as exc:  # e.g. the task was already answered and a new one is open
            status = f"error: {exc}"[:80]
        statuses[status] = statuses.get(status, 0) + 1
        if status in ("saved", "already recorded"):
            acked.append(token)
        client.close()
    return statuses


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labelers", type=int, default=16)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--kill_after", type=int, default=300, help="acknowledged votes per cycle before the kill")
    ap.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--client", choices=sorted(TRANSPORTS), default="direct",
                    help="direct: as the app's page calls it (default); gradio_client: through Gradio's queue")
    ap.add_argument("--json", default=None)
    ap.add_argument("--record", default=None,
                    help="record file (default bench/results/label_crash.json, label_crash_postgresql.json)")
    args = ap.parse_args(argv)
    record = Record("label_crash" + ("" if args.backend == "sqlite" else "_postgresql"), argv, path=args.record)
    with bench_database(args.backend, "label_crash") as (db, database):
        summary = run_cycles(args, db)
    print(json.dumps(summary, indent=2))
    settings = {"labelers": args.labelers, "cycles": args.cycles, "kill_after": args.kill_after, "think_s": 0,
                "signal": "SIGKILL", "database": database, "transport": TRANSPORTS[args.client],
                **library_versions()}
    record.write({k: v for k, v in summary.items() if k != "labelers"}, settings)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


def run_cycles(args, db: str) -> dict:
    """Kill the server ``cycles`` times under load on ``db``, restarting and re-sending; the summary."""
    names = [f"labeler{i:02d}" for i in range(args.labelers)]
    make_project(db, {n: "labeler" for n in names}, n_pairs=args.cycles * args.kill_after * 2 + 200).close()
    acked: list[str] = []
    cycles = []
    for cycle in range(args.cycles):
        port = free_port()
        server = start_server(db, port, 16)
        url = f"http://127.0.0.1:{port}/"
        if cycle:
            resent = resend(url, cycles[-1]["in_flight"], acked, args.client)
            cycles[-1]["resent_after_restart"] = resent
        before = len(acked)
        t0 = time.perf_counter()
        in_flight = run_until_killed(url, names, before + args.kill_after, server, acked, args.client)
        after_kill = check_db(db, acked)
        cycles.append({
            "acknowledged_this_cycle": len(acked) - before,
            "seconds_to_kill": round(time.perf_counter() - t0, 1),
            "in_flight_at_kill": len(in_flight),
            "after_kill": after_kill,
            "in_flight": in_flight,
        })  # fmt: skip
        print(f"cycle {cycle}: {json.dumps({k: v for k, v in cycles[-1].items() if k != 'in_flight'})}", flush=True)
    port = free_port()
    server = start_server(db, port, 16)
    cycles[-1]["resent_after_restart"] = resend(f"http://127.0.0.1:{port}/", cycles[-1]["in_flight"], acked,
                                                args.client)
    stop_server(server)
    final = check_db(db, acked)
    summary = {
        "labelers": args.labelers,
        "cycles": [{k: v for k, v in c.items() if k != "in_flight"} for c in cycles],
        "final": final,
        "ok": final["acknowledged_missing"] == 0 and final["duplicates_in_db"] == 0 and final["integrity_check"] == "ok"
        and all(c["after_kill"]["acknowledged_missing"] == 0 and c["after_kill"]["integrity_check"] == "ok"
                for c in cycles),
    }  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
