"""The ``rlhf label ...`` command tree (argparse only; the work lives in the other modules).

``add_label_parser(subparsers)`` adds ``label`` with the subcommands ``init``,
``user add``, ``user list``, ``user disable``, ``user enable``, ``candidates``,
``import``, ``serve``, ``export`` and ``stats``. Each leaf sets ``func``, a callable taking the parsed Namespace;
user mistakes raise :class:`rlhf.errors.UserError`.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import json
import math
import os
import sys

from rlhf.config import add_config_arguments, config_from_namespace
from rlhf.errors import UserError

DEFAULT_DB = "label.db"


# helper functions


def _add_db(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default=DEFAULT_DB, help="database: a file path or sqlite:///FILE (SQLite, WAL) "
                        f"or postgresql://... [default: {DEFAULT_DB}]")  # fmt: skip


def read_password() -> str:
    """From ``RLHF_PASSWORD``, else a prompt (typed twice) on a terminal, else one line of stdin."""
    password = os.environ.get("RLHF_PASSWORD")
    if password is None:
        if sys.stdin.isatty():
            password = getpass.getpass("password: ")
            if getpass.getpass("again: ") != password:
                raise UserError("the two passwords differ")
        else:
            password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise UserError("no password given: set RLHF_PASSWORD or type it on stdin (never on the command line)")
    return password


def _database_errors(func):
    """Run a command so that a database failure (connection refused, broken file) is one UserError line."""

    @functools.wraps(func)
    def run(args) -> None:
        from feedback_ui.db_errors import database_errors
        from feedback_ui.db_url import normalize_url

        with database_errors(normalize_url(args.db)):
            func(args)

    return run


def _check_listen(host: str, port: int) -> None:
    """The app can listen on ``host:port`` (checked before the app and its libraries load)."""
    import socket

    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(infos[0][4])
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _session_policy(args):
    from datetime import timedelta

    from feedback_ui.sessions import SessionPolicy

    for flag in ("session_idle_minutes", "session_max_hours"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"--{flag} must be > 0, got {value}")
    return SessionPolicy(idle=timedelta(minutes=args.session_idle_minutes),
                         lifetime=timedelta(hours=args.session_max_hours))  # fmt: skip


def _assignment_ttl(minutes: float):
    """--assignment_ttl minutes -> a timedelta; 0 means open assignments never expire (None)."""
    from datetime import timedelta

    if not (math.isfinite(minutes) and minutes >= 0):
        raise UserError(f"--assignment_ttl must be a number of minutes >= 0 (0: never expire), got {minutes}")
    return timedelta(minutes=minutes) if minutes > 0 else None


def _check_tls(certfile, keyfile) -> None:
    """Both or neither given; both readable; the key belongs to the certificate (checked before the app loads)."""
    import ssl

    if bool(certfile) != bool(keyfile):
        raise UserError("--ssl_certfile and --ssl_keyfile go together: give both for HTTPS, or neither")
    if not certfile:
        return
    for flag, path in (("--ssl_certfile", certfile), ("--ssl_keyfile", keyfile)):
        if not os.path.isfile(path):
            raise UserError(f"{flag} {path}: no such file")
        if not os.access(path, os.R_OK):
            raise UserError(f"{flag} {path}: not readable")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except ssl.SSLError as exc:
        raise UserError(
            f"--ssl_certfile/--ssl_keyfile: not a PEM certificate and its matching key ({exc.reason})"
        ) from None
    except OSError as exc:
        raise UserError(f"--ssl_certfile/--ssl_keyfile: cannot read them ({exc.strerror or exc})") from None


# commands


@_database_errors
def cmd_init(args) -> None:
    from feedback_ui.store import init_db

    from feedback_ui.db_url import shown_url

    with init_db(args.db) as store:
        print(f"database ready: {shown_url(store.url)}")


@_database_errors
def cmd_user_add(args) -> None:
    from feedback_ui.auth import add_user, check_user_name
    from feedback_ui.store import open_store

    check_user_name(args.name)  # before the password is asked for
    with open_store(args.db) as store:
        add_user(store, args.name, read_password(), args.role)
    print(f"user {args.name} ({args.role}) added")


@_database_errors
def cmd_user_list(args) -> None:
    from feedback_ui.auth import list_users
    from feedback_ui.store import open_store

    with open_store(args.db) as store:
        users = list_users(store)
    for u in users:
        print(f"{u.name}\t{u.role}\t{u.created_at:%Y-%m-%d %H:%M}" + ("\tdisabled" if u.disabled_at else ""))


@_database_errors
def cmd_user_disable(args) -> None:
    from feedback_ui.auth import set_disabled
    from feedback_ui.store import open_store

    if getattr(args, "requeue", False):
        from feedback_ui.requeue import disable_and_requeue

        with open_store(args.db) as store:
            done = disable_and_requeue(store, args.name)
        ended = done["sessions_ended"]
        print(f"user {args.name} disabled; {ended} session{'s' * (ended != 1)} ended; {done['votes_voided']} votes "
              f"voided (kept, no longer counted); {done['comparisons_requeued']} comparisons back in the pool")
        return
    with open_store(args.db) as store:
        ended = set_disabled(store, args.name, disabled=args.user_command == "disable")
    if args.user_command == "disable":
        print(f"user {args.name} disabled; {ended} session{'s' * (ended != 1)} ended")
    else:
        print(f"user {args.name} enabled")


def cmd_candidates(args) -> None:
    from feedback_ui.candidates import run_label_candidates
    from feedback_ui.config import LabelCandidatesConfig
    from feedback_ui.db_errors import database_errors
    from feedback_ui.db_url import normalize_url

    cfg = config_from_namespace(LabelCandidatesConfig, args)
    with database_errors(normalize_url(cfg.db)):
        run_label_candidates(cfg)


@_database_errors
def cmd_import(args) -> None:
    from feedback_ui.imports import run_label_import

    if args.overlap < 1:
        raise UserError(f"--overlap must be >= 1, got {args.overlap}")
    run_label_import(args.db, args.file, mode=args.mode, overlap=args.overlap)


@_database_errors
def cmd_serve(args) -> None:
    from feedback_ui.http_policy import parse_allowed_origins, parse_trusted_proxies
    from feedback_ui.store import open_store

    if args.gold_rate is not None and not (math.isfinite(args.gold_rate) and 0 <= args.gold_rate < 1):
        raise UserError(f"--gold_rate must be in [0, 1), got {args.gold_rate}")
    if args.concurrency < 1:
        raise UserError(f"--concurrency must be >= 1, got {args.concurrency}")
    origins = parse_allowed_origins(args.allowed_origins)
    proxies = parse_trusted_proxies(args.trusted_proxies)
    sessions = _session_policy(args)
    ttl = _assignment_ttl(args.assignment_ttl)
    _check_tls(args.ssl_certfile, args.ssl_keyfile)
    _check_listen(args.host, args.port)
    open_store(args.db).close()  # a missing or broken database stops here, before the app loads
    from feedback_ui.server import launch

    launch(args.db, host=args.host, port=args.port, gold_rate=args.gold_rate, concurrency=args.concurrency,
           allowed_origins=origins, sessions=sessions, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
           assignment_ttl=ttl, trusted_proxies=proxies)  # fmt: skip


@_database_errors
def cmd_export(args) -> None:
    from feedback_ui.config import LabelExportConfig
    from feedback_ui.db_url import normalize_url, sqlite_path
    from feedback_ui.export import export_preferences, held_out_path
    from feedback_ui.store import open_store
    from rlhf.config import build_config, config_to_dict
    from rlhf.outputs import check_not_input, check_output_file

    keep = [k.strip() for k in args.keep.split(",") if k.strip()]
    options = build_config(LabelExportConfig, {
        "strategy": args.strategy, "aggregate": args.aggregate, "keep": keep, "test_fraction": args.test_fraction,
        "seed": args.seed, "margin_slightly": args.margin_slightly, "margin_much": args.margin_much,
    })  # fmt: skip
    database = {"--db": str(sqlite_path(normalize_url(args.db)) or "")}
    check_output_file(args.out, "--out")
    check_not_input(args.out, database, "--out", replaced=False)
    check_output_file(held_out_path(args.out), "held-out file")  # written, or an old one removed
    check_not_input(held_out_path(args.out), database, "held-out file", replaced=False)
    with open_store(args.db) as store:
        counts = export_preferences(store, args.out, **config_to_dict(options))
    line = f"{counts['rows']} preference rows from {counts['comparisons']} comparisons -> {counts['out']}"
    if "test_out" in counts:
        line += f"; {counts['test_rows']} held-out rows -> {counts['test_out']}"
    if "removed" in counts:
        line += f"; removed the held-out file of an earlier export, {counts['removed']} (no --test_fraction)"
    print(line)
    if counts["comparisons"] == 0:
        print("warning: no comparison has been answered yet, so the files are empty (labelers vote in the app: "
              "rlhf label serve)", file=sys.stderr)


@_database_errors
def cmd_stats(args) -> None:
    from feedback_ui.stats import collect_stats, format_stats
    from feedback_ui.store import open_store

    with open_store(args.db) as store:
        stats = collect_stats(store)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))


# the parser


def add_label_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``label`` command and its subcommands to an argparse ``subparsers`` object."""
    from feedback_ui.config import LabelCandidatesConfig
    from feedback_ui.pairs import AGGREGATIONS, STRATEGIES

    label = subparsers.add_parser("label",
                                  help="preference labeling: database, users, candidates, import, app, export, stats",
                                  description="Collect human preferences between model responses.")  # fmt: skip
    label.set_defaults(func=lambda _args: label.print_help())
    sub = label.add_subparsers(dest="label_command", metavar="COMMAND")

    p = sub.add_parser("init", help="create the database schema (safe to repeat)")
    _add_db(p)
    p.set_defaults(func=cmd_init)

    user = sub.add_parser("user", help="manage accounts: user add NAME, user list, user disable|enable NAME")
    user.set_defaults(func=lambda _args: user.print_help())
    users = user.add_subparsers(dest="user_command", metavar="ACTION")
    p = users.add_parser("add", help="create an account; password from RLHF_PASSWORD or stdin, never argv")
    p.add_argument("name", help="login name (letters, digits, _ . @ -)")
    p.add_argument("--role", choices=["labeler", "admin"], default="labeler", help="account role [default: labeler]")
    _add_db(p)
    p.set_defaults(func=cmd_user_add)
    p = users.add_parser("list", help="list accounts and roles")
    _add_db(p)
    p.set_defaults(func=cmd_user_list)
    p = users.add_parser("disable", help="block an account and end its sessions at once")
    p.add_argument("name", help="login name")
    p.add_argument("--requeue", action="store_true",
                   help="also void the account's votes (kept, marked) and return its comparisons to the pool")
    _add_db(p)
    p.set_defaults(func=cmd_user_disable)
    p = users.add_parser("enable", help="let a disabled account log in again")
    p.add_argument("name", help="login name")
    _add_db(p)
    p.set_defaults(func=cmd_user_disable)

    p = sub.add_parser("candidates", help="generate K responses per prompt from a policy and build comparisons")
    add_config_arguments(p, LabelCandidatesConfig)
    p.set_defaults(func=cmd_candidates)

    p = sub.add_parser("import", help="responses made elsewhere (prompt, response, model) -> comparisons between "
                       "models", description="Import a JSONL file of responses (columns prompt, response, model; "
                       "the prompt a string or a list of messages) and compare the responses of different models "
                       "to the same prompt. Importing the same file again adds nothing; new rows add only what is "
                       "new. Prompts answered by one model only are skipped and counted.")
    _add_db(p)
    p.add_argument("--file", required=True, help="JSONL with the columns prompt, response, model")
    p.add_argument("--mode", choices=["pairwise", "ranking"], default="pairwise",
                   help="pairwise: every pair of responses of different models; ranking: one K-wise ranking of "
                   "a prompt's responses (at most 8) [default: pairwise]")
    p.add_argument("--overlap", type=int, default=1,
                   help="labelers who see each comparison (>= 2 gives agreement numbers) [default: 1]")
    p.set_defaults(func=cmd_import)  # fmt: skip

    p = sub.add_parser("serve", help="the Gradio labeling app (login required)")
    _add_db(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on [default: 127.0.0.1]")
    p.add_argument("--port", type=int, default=7860, help="port [default: 7860]")
    p.add_argument("--gold_rate", type=float, default=None,
                   help="share of tasks drawn from gold items [default: the value stored by 'label candidates', read "
                        "whenever a task is drawn]")
    p.add_argument("--concurrency", type=int, default=16, help="requests handled at once [default: 16]")
    p.add_argument("--allowed_origins", default="", metavar="ORIGIN[,ORIGIN...]",
                   help="other origins (https://host[:port]) whose browser requests are accepted, e.g. the public "
                   "address of a proxy in front of the app [default: none: same origin only]")
    p.add_argument("--trusted_proxies", default="", metavar="IP[,IP...]",
                   help="addresses or networks (e.g. 127.0.0.1, 10.0.0.0/8) of reverse proxies whose X-Forwarded-For "
                   "gives the client address (for the per-address login limit) and X-Forwarded-Proto the scheme; "
                   "the proxy must overwrite or append to that header [default: none: the headers are ignored]")
    p.add_argument("--ssl_certfile", default=None, metavar="FILE", help="PEM certificate: serve HTTPS [default: HTTP]")
    p.add_argument("--ssl_keyfile", default=None, metavar="FILE", help="PEM private key of --ssl_certfile")
    p.add_argument("--session_idle_minutes", type=float, default=60,
                   help="a login unused this long ends [default: 60]")
    p.add_argument("--session_max_hours", type=float, default=12,
                   help="a login ends this long after it began, used or not [default: 12]")
    p.add_argument("--assignment_ttl", type=float, default=30, metavar="MINUTES",
                   help="an open task nobody answered for this long goes back to the pool for other labelers "
                   "(a late answer still counts if the comparison needs it); 0 = never [default: 30]")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="votes -> preference JSONL (prompt, chosen, rejected, margin, provenance)")
    _add_db(p)
    p.add_argument("--out", default="prefs.jsonl", help="output JSONL; with --test_fraction the held-out prompts go "
                   "to the sibling OUT_STEM.test.jsonl (prefs.jsonl -> prefs.test.jsonl), without it an old such "
                   "file is removed [default: prefs.jsonl]")
    p.add_argument("--strategy", choices=STRATEGIES, default="all-pairs",
                   help="rankings -> pairs: every ordered pair, or the best against each of the rest "
                   "[default: all-pairs]")
    p.add_argument("--aggregate", choices=AGGREGATIONS, default="majority",
                   help="several labelers on one comparison: strict-majority pairs, or every vote [default: majority]")
    p.add_argument("--keep", default="", help="comma list of extra outcomes to export: tie, both_bad; each is written "
                   "twice, once each way round with margin 0 (no preference for either) [default: none]")
    p.add_argument("--test_fraction", type=float, default=0.0,
                   help="share of prompts held out (split by prompt, never by row) [default: 0]")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt split [default: 0]")
    p.add_argument("--margin_slightly", type=float, default=1.0, help="margin of 'slightly better' [default: 1.0]")
    p.add_argument("--margin_much", type=float, default=3.0, help="margin of 'much better' [default: 3.0]")
    p.set_defaults(func=cmd_export)  # fmt: skip

    p = sub.add_parser("stats", help="progress, per-labeler counts, agreement (Cohen's kappa, Krippendorff's alpha)")
    _add_db(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table [default: off]")
    p.set_defaults(func=cmd_stats)
    return label
