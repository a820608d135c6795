"""What one vote costs the database side of the labeling app, without HTTP or Gradio.

Calls ``feedback_ui.tasks.answer`` (expiry check, the vote, the next task and the view, one
transaction) in a loop for 32 labelers in turn, one thread, on a fresh SQLite file or a throwaway
PostgreSQL cluster (durable defaults), and reports the app process's CPU time and the wall time per
vote, then (untimed, one vote per labeler) the SQL statements and transactions per vote.
``bench/label_load.py`` measures the whole server (Gradio's queue, HTTP, the gate); this isolates the part the
store's statements decide.

    python bench/vote_handler.py --backend postgresql --trees OLD_CHECKOUT,. --rounds 2

``--trees`` compares code: each listed checkout's ``feedback_ui`` is measured in a subprocess of its
own, alternating, ``--rounds`` times each, so slow and fast minutes of the machine fall on both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(backend: str, labelers: int, pairs: int, votes: int, warmup: int = 64) -> dict:
    """Per-vote CPU and wall milliseconds of ``tasks.answer`` with the ``feedback_ui`` importable now."""
    import sqlalchemy as sa

    from feedback_ui.tasks import answer, serve
    from feedback_ui.testing import make_project
    from label_load import bench_database  # after feedback_ui: it puts this checkout first on sys.path

    with bench_database(backend, "vote_handler") as (db, _):
        names = [f"labeler{i:02d}" for i in range(labelers)]
        store = make_project(db, {n: "labeler" for n in names}, n_pairs=pairs, overlap=2)
        ttl = timedelta(minutes=30)
        views = {n: serve(store, n, 0.0, assignment_ttl=ttl) for n in names}

        def run(n_votes: int) -> None:
            for k in range(n_votes):
                name = names[k % labelers]
                views[name] = answer(store, name, views[name]["token"], 0.0, assignment_ttl=ttl, choice="A")
                if not views[name]["token"]:
                    raise SystemExit("error: the project ran out of tasks; raise --pairs")

        run(warmup)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        run(votes)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        counts = {"statements": 0, "transactions": 0}  # after the timing: the listeners cost time themselves

        def statement(conn, cursor, sql, *rest):
            counts["statements"] += not sql.startswith("BEGIN")  # SQLite's BEGIN is sent as a statement

        def transaction(conn):
            counts["transactions"] += 1

        sa.event.listen(store.engine, "before_cursor_execute", statement)
        sa.event.listen(store.engine, "begin", transaction)
        run(labelers)
        store.close()
    return {"app_cpu_ms_per_vote": round(1000 * cpu / votes, 2), "wall_ms_per_vote": round(1000 * wall / votes, 2),
            "statements_per_vote": round(counts["statements"] / labelers, 2),
            "transactions_per_vote": round(counts["transactions"] / labelers, 2)}


def commit_of(tree: Path) -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True)
    return out.stdout.strip()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--labelers", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=400, help="pair comparisons in the project (overlap 2)")
    ap.add_argument("--votes", type=int, default=320, help="votes timed per measurement (after 64 untimed)")
    ap.add_argument("--trees", default=".", help="comma-separated checkouts whose feedback_ui is measured")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--record", default=None, help="record name (default vote_handler_<backend>)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure this tree and print JSON
    args = ap.parse_args(argv)
    if 2 * args.pairs < args.votes + 64 + 2 * args.labelers:
        ap.error("--pairs too small for --votes (each pair takes two votes)")
    if args.one:
        sys.path.insert(0, args.one)
        print(json.dumps(measure(args.backend, args.labelers, args.pairs, args.votes)))
        return {}

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_record import Record

    record = Record(args.record or f"vote_handler_{args.backend}", argv)
    trees = [Path(t).resolve() for t in args.trees.split(",")]
    runs: dict[str, list[dict]] = {str(t): [] for t in trees}
    for r in range(args.rounds):
        for tree in trees:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", str(tree), "--backend", args.backend,
                   "--labelers", str(args.labelers), "--pairs", str(args.pairs), "--votes", str(args.votes)]
            out = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"error: measuring {tree} failed:\n{out.stderr[-2000:]}")
            runs[str(tree)].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}, {tree}: {runs[str(tree)][-1]}", flush=True)
    figures = {}
    for tree, rows in runs.items():
        name = "this checkout" if Path(tree) == ROOT else tree
        figures[name] = {
            "commit": commit_of(Path(tree)),
            "runs": rows,
            "median_app_cpu_ms_per_vote": statistics.median(r["app_cpu_ms_per_vote"] for r in rows),
            "median_wall_ms_per_vote": statistics.median(r["wall_ms_per_vote"] for r in rows),
            **{key: rows[-1][key] for key in ("statements_per_vote", "transactions_per_vote") if key in rows[-1]},
        }
    settings = {"backend": args.backend, "labelers": args.labelers, "pairs": args.pairs, "overlap": 2,
                "votes_timed": args.votes, "rounds": args.rounds, "assignment_ttl_minutes": 30,
                "database": "SQLite, WAL, synchronous=FULL" if args.backend == "sqlite"
                else "throwaway PostgreSQL cluster on loopback, durable defaults (fsync, synchronous_commit on)"}
    record.write(figures, settings)
    print(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
