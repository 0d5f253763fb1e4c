"""`streamrec` command line: argv -> Config -> the command's run function.

Every config field is a flag `--section-field` with an env twin `STREAMREC_SECTION_FIELD` (shown
in --help); `--config FILE` reads TOML. Signal handlers live here only: SIGTERM/SIGINT set the
stop event the worker loop checks; a second SIGINT exits at once.

Size: over 400 lines because every command's flags are declared here, so `streamrec --help`
and the dispatch read as one table.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

# One BLAS thread per process, set before numpy loads OpenBLAS (as torch gets one thread): on 2
# shared cores OpenBLAS's second thread spun at ~45% of a core in the scorer, and its top-k
# stage took 1.6x as long. An operator's own OPENBLAS_NUM_THREADS wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pipeline.config import Config, env_name, field_specs, load
from pipeline.errors import StreamrecError
from pipeline.logformat import formatter_for

__all__ = ["main", "build_parser", "install_stop_handlers"]

log = logging.getLogger("streamrec")

_COMMANDS = {
    "broker": "start the embedded Tansu broker on 127.0.0.1 and create the topics",
    "bootstrap": "train the first model (from a built-in dataset, your own files, or the "
    "topics) and publish it to the registry",
    "updater": "run the updater worker (events -> user vectors)",
    "scorer": "run the scorer worker (user vectors -> recommendations)",
    "finetune": "run the fine-tune worker (feedback -> evaluated, promoted model versions)",
    "replay": "produce a dataset's (or your own files') items and events to the topics, in "
    "time order",
    "tail": "print recommendations with their reasons as they arrive",
    "up": "run the broker (unless a cluster is configured) and all workers; Ctrl-C stops all",
    "demo": "the end-to-end demo on embedded defaults (what `make demo` runs)",
    "model": "list model versions, or roll back to one",
    "experiment": "prequential: frozen vs continual online HR@10/NDCG@10 over a replay; "
    "coldstart: trending fallback vs model alone vs popularity on an unseen catalog",
    "bench": "measure event->recommendation latency and throughput of the real workers",
    "chaos": "fault scenarios against the real workers, checked against a clean reference",
    "evaluate": "offline quality on RecBole's sequential protocol, with baselines (JSON)",
}


def _config_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--config",
        metavar="FILE",
        default=os.environ.get("STREAMREC_CONFIG"),
        help="TOML config file [env STREAMREC_CONFIG]",
    )
    parent.add_argument(
        "--log-level",
        default=os.environ.get("STREAMREC_LOG_LEVEL", "INFO"),
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity [env STREAMREC_LOG_LEVEL]",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for spec in field_specs():
        group = groups.get(spec.section) or groups.setdefault(
            spec.section, parent.add_argument_group(f"{spec.section} settings")
        )
        default = "(secret)" if spec.secret and spec.default else repr(spec.default)
        why = f"{spec.help}; ".replace("%", "%%") if spec.help else ""  # argparse formats with %
        help_text = f"{why}default {default} [env {env_name(spec.section, spec.name)}]"
        kwargs: dict[str, Any] = {
            "dest": spec.key,
            "default": None,
            "help": help_text,
            "metavar": spec.type.__name__.upper(),
        }
        group.add_argument(spec.flag, **kwargs)
    return parent


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("streamrec")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parent = _config_parent()
    parser = argparse.ArgumentParser(
        prog="streamrec",
        description="Streaming personalization on Kafka: fresh user vectors, "
        "top-k recommendations with reasons, continual learning.",
    )
    parser.add_argument("--version", action="version", version=f"streamrec {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {
        name: sub.add_parser(
            name, parents=[parent], help=text, description=text, usage=f"streamrec {name} [options]"
        )
        for name, text in _COMMANDS.items()
    }
    bootstrap = commands["bootstrap"]
    bootstrap.add_argument(
        "--items",
        metavar="PATH",
        help="your catalog: JSON Lines of Item messages (gzip allowed); "
        "with --events, replaces training.dataset",
    )
    bootstrap.add_argument(
        "--events",
        metavar="PATH",
        help="your interactions: JSON Lines of Event messages (gzip allowed)",
    )
    bootstrap.add_argument(
        "--from-topics",
        action="store_true",
        help="train on what the items and events topics hold now (read to "
        "their current end, without joining any group); announces the model",
    )
    bootstrap.add_argument(
        "--announce",
        action="store_true",
        help="also produce the ModelUpdate, so running workers swap to it",
    )
    replay = commands["replay"]
    replay.add_argument("--dataset", choices=["ml-100k", "synthetic"], default="ml-100k")
    replay.add_argument(
        "--items",
        metavar="PATH",
        help="replay your own catalog (JSON Lines of Item messages, gzip "
        "allowed) instead of --dataset; needs --events",
    )
    replay.add_argument(
        "--events",
        metavar="PATH",
        help="replay your own events (JSON Lines of Event messages), in time order",
    )
    replay.add_argument(
        "--from-fraction",
        type=float,
        default=0.0,
        help="skip the first fraction of events by time (0.8 = replay the last 20%%)",
    )
    replay.add_argument("--rate", type=float, default=0.0, help="events/s; 0 = as fast as possible")
    replay.add_argument(
        "--limit", type=int, default=0, help="stop after this many events (0 = all)"
    )
    replay.add_argument("--no-items", action="store_true", help="do not produce the catalog first")
    tail = commands["tail"]
    tail.add_argument("--max", type=int, default=0, help="stop after this many (0 = forever)")
    tail.add_argument("--from-beginning", action="store_true")
    tail.add_argument("--timeout-s", type=float, default=0.0, help="stop after this long idle")
    up = commands["up"]
    up.add_argument(
        "--bootstrap-dataset",
        choices=["ml-100k", "synthetic"],
        default=None,
        help="when the registry is empty, train the first model on this built-in "
        "dataset (default: none; the workers start without a model and say how to "
        "bootstrap from your data)",
    )
    demo = commands["demo"]
    demo.add_argument("--rate", type=float, default=1000.0, help="replay rate, events/s")
    demo.add_argument("--retrain", action="store_true", help="bootstrap even if a model exists")
    bench = commands["bench"]
    bench.add_argument("--rate", type=float, default=1000.0, help="offered load, events/s")
    bench.add_argument("--duration-s", type=float, default=60.0, help="offered-load duration")
    bench.add_argument("--users", type=int, default=10_000)
    bench.add_argument("--items", type=int, default=2000, help="item ids events refer to")
    bench.add_argument("--saturation-events", type=int, default=50_000)
    bench.add_argument("--ceiling-events", type=int, default=50_000)
    bench.add_argument(
        "--mode",
        action="append",
        choices=["ceiling", "floor", "offered", "saturation", "catalog", "memory", "probe"],
        help="run only these (repeatable); default ceiling, offered, saturation; floor: "
        "the latency of a raw pass-through at the offered rate, which offered is compared with; "
        "probe (alone) times the running deployment from outside",
    )
    bench.add_argument(
        "--instances",
        type=int,
        default=1,
        help="processes per worker (updater and scorer), for scale-out",
    )
    bench.add_argument(
        "--topology",
        choices=["separate", "colocated", "both"],
        help="serving topology the offered load and saturation measure: "
        "separate (updater + scorer), colocated (the updater scores: "
        "updater.score), or both one after the other (default: the one the "
        "configuration runs)",
    )
    bench.add_argument("--json", action="store_true", help="print only the JSON object")
    chaos = commands["chaos"]
    chaos.add_argument(
        "--scenario",
        action="append",
        metavar="NAME",
        help="run only these (repeatable): kill-updater, kill-colocated, kill-scorer, "
        "sigterm, fault-points, corrupt-snapshot, kill-finetune, pause-updater, "
        "broker-loss, broker-stall, rebalance-storm, clean, bad-input; default "
        "the first seven",
    )
    chaos.add_argument(
        "--profile",
        choices=["short", "full"],
        default="short",
        help="short: minutes, 200 events/s; full: 1,000 events/s, 8 kills, 5 per point",
    )
    chaos.add_argument("--rate", type=float, default=0.0, help="override the profile's events/s")
    chaos.add_argument("--seed", type=int, default=1)
    chaos.add_argument("--keep", action="store_true", help="keep the scenario dirs (logs, state)")
    evaluate = commands["evaluate"]
    evaluate.add_argument("--dataset", choices=["ml-100k", "synthetic"], default="ml-100k")
    evaluate.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--no-baselines", action="store_true")
    evaluate.add_argument("--no-cold-start", action="store_true")
    evaluate.add_argument("--cold-fraction", type=float, default=0.1)
    evaluate.add_argument("--quiet", action="store_true")
    evaluate.add_argument(
        "--jobs", type=int, default=1, help="fits to run at once, one process each (same figures)"
    )
    model = commands["model"]
    model.add_argument("action", choices=["list", "rollback"])
    model.add_argument("version", nargs="?")
    experiment = commands["experiment"]
    experiment.add_argument(
        "kind",
        choices=["prequential", "coldstart"],
        help="prequential: frozen vs continual over a replay; coldstart: on "
        "a catalog the model never saw, the trending fallback vs the model "
        "alone vs popularity (the synthetic drift scenario; --dataset, --runs, "
        "--every-events, --rate and --bootstrap-fraction do not apply)",
    )
    experiment.add_argument("--dataset", choices=["ml-100k", "synthetic"], default="ml-100k")
    experiment.add_argument("--json", action="store_true", help="print the figures as JSON")
    experiment.add_argument(
        "--runs",
        type=int,
        default=10,
        help="fine-tune boundaries over the replayed part (default 10)",
    )
    experiment.add_argument(
        "--every-events",
        type=int,
        default=0,
        help="fine-tune every this many replayed events (overrides --runs)",
    )
    experiment.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="replay each fine-tune chunk in time order at this many "
        "events/s (default 0: round by round, each user's next event waiting "
        "for the recommendation of their previous one, so every event is "
        "judged)",
    )
    experiment.add_argument(
        "--bootstrap-fraction",
        type=float,
        default=None,
        help="share of ML-100K (in time order) the bootstrap model trains "
        "on; the rest is replayed (default 0.5, so the frozen model has time "
        "to age; the synthetic drift scenario always splits at its era "
        "boundary)",
    )
    experiment.add_argument(
        "--bootstrap-models",
        metavar="DIR",
        default=None,
        help="reuse this registry dir as the bootstrap instead of training one",
    )
    experiment.add_argument(
        "--era-events",
        type=int,
        default=15_000,
        help="coldstart: events of each era of the drift scenario (the "
        "second era is replayed; default 15,000)",
    )
    experiment.add_argument(
        "--first-events",
        type=int,
        default=5_000,
        help="coldstart: the first minutes, in replayed events, judged apart (default 5,000)",
    )
    return parser


def install_stop_handlers(stop: threading.Event) -> None:
    """SIGTERM/SIGINT ask the loop to drain and exit; a second SIGINT exits immediately."""

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            log.warning("second interrupt: exiting now")
            os._exit(130)
        log.info("%s received: draining and stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        spec.key: getattr(args, spec.key)
        for spec in field_specs()
        if getattr(args, spec.key, None) is not None
    }


def _flags(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The flags whose destination is named as the parameter they are passed to."""
    return {name: getattr(args, name) for name in names}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):  # from STREAMREC_LOG_LEVEL
        parser.error(f"STREAMREC_LOG_LEVEL={args.log_level!r} is not DEBUG, INFO, WARNING or ERROR")
    with _log_handler(args.log_level) as handler:
        try:
            with _held_back(handler):  # load() may warn before the log format is known
                config = load(args.config, overrides=_overrides(args))
                handler.setFormatter(formatter_for(config.logging.format, args.command))
            return _dispatch(args, config)
        except StreamrecError as exc:
            print(f"streamrec {args.command}: error: {exc}", file=sys.stderr)
            return 2


@contextlib.contextmanager
def _log_handler(level: str) -> Iterator[logging.Handler]:
    """The root logger's stderr handler, in the text format until the config says otherwise;
    removed again when main() returns (the tests call main in-process, many times)."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter_for("text", ""))
    root.addHandler(handler)
    previous_level = root.level
    root.setLevel(level)
    for noisy in ("kafka", "faiss"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)


@contextlib.contextmanager
def _held_back(handler: logging.Handler) -> Iterator[None]:
    """Keep `handler`'s records until the block ends (its formatter chosen by then), then write
    them; also when the block raises, so a config warning is never lost."""
    held: list[logging.LogRecord] = []
    handle = handler.handle
    handler.handle = held.append  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        handler.handle = handle  # type: ignore[method-assign]
        for record in held:
            handler.handle(record)


def _dispatch(args: argparse.Namespace, config: Config) -> int:
    command: str = args.command
    if command == "model":
        from workers.models import run as run_model

        return run_model(config, args.action, args.version)
    if command == "experiment":
        from workers.lab.experiment import run as run_experiment

        stop = threading.Event()
        install_stop_handlers(stop)
        boot_models = Path(args.bootstrap_models) if args.bootstrap_models else None
        if args.kind == "coldstart":
            from workers.lab.coldstart import run as run_coldstart

            run_coldstart(
                config,
                **_flags(args, "first_events"),
                as_json=args.json,
                n_events=args.era_events,
                bootstrap_models=boot_models,
                stop=stop,
            )
            return 0
        run_experiment(
            config,
            **_flags(args, "dataset", "runs", "every_events", "rate", "bootstrap_fraction"),
            as_json=args.json,
            stop=stop,
            bootstrap_models=boot_models,
        )
        return 0
    if command == "bootstrap":
        return _run_bootstrap(config, args)
    if command == "bench":
        return _run_bench(config, args)
    if command == "evaluate":
        from workers.lab.evaluate import run as run_evaluate

        run_evaluate(
            config,
            dataset=args.dataset,
            seeds=tuple(int(s) for s in args.seeds.split(",") if s.strip()),
            as_json=args.json,
            baselines=not args.no_baselines,
            cold_start=not args.no_cold_start,
            cold_fraction=args.cold_fraction,
            jobs=args.jobs,
            verbose=not args.quiet,
        )
        return 0
    if command == "chaos":
        return _run_chaos(config, args)
    if command == "replay":
        from workers.replay import run as run_replay

        if (args.items is None) != (args.events is None):
            print("streamrec replay: --items and --events go together", file=sys.stderr)
            return 2
        run_replay(
            config,
            **_flags(args, "dataset", "from_fraction", "rate", "limit"),
            items=not args.no_items,
            items_path=args.items,
            events_path=args.events,
        )
        return 0
    if command == "finetune" and not config.finetune.enabled:
        log.warning("finetune.enabled is false: continual learning is off, nothing to run")
        return 0
    stop = threading.Event()
    install_stop_handlers(stop)
    runners: dict[str, Callable[[], Any]] = {
        "broker": lambda: _run_broker(config, stop),
        "updater": lambda: _run_worker(config, "updater", stop),
        "scorer": lambda: _run_worker(config, "scorer", stop),
        "finetune": lambda: _run_worker(config, "finetune", stop),
        "tail": lambda: _run_tail(config, args, stop),
        "up": lambda: _run_up(config, args, stop),
        "demo": lambda: _run_demo(config, args, stop),
    }
    result = runners[command]()
    return int(result or 0)


def _run_bench(config: Config, args: argparse.Namespace) -> int:
    import orjson

    from workers.lab.bench import TOPOLOGIES, format_table
    from workers.lab.bench import run as run_bench

    result = run_bench(
        config,
        **_flags(
            args,
            "rate",
            "duration_s",
            "users",
            "items",
            "saturation_events",
            "ceiling_events",
            "instances",
        ),
        modes=tuple(args.mode or ("ceiling", "offered", "saturation")),
        topologies={None: (), "both": TOPOLOGIES}.get(args.topology, (args.topology,)),
    )
    if not args.json:
        print(format_table(result), file=sys.stderr)
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    return 0


def _run_chaos(config: Config, args: argparse.Namespace) -> int:
    import orjson

    from workers.lab.chaos import KILL_FINETUNE, SCENARIOS
    from workers.lab.chaos import run as run_chaos

    names = args.scenario or [
        "kill-updater",
        "kill-colocated",
        "kill-scorer",
        "sigterm",
        "fault-points",
        "corrupt-snapshot",
        KILL_FINETUNE,
    ]
    known = sorted([*SCENARIOS, KILL_FINETUNE])
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"streamrec chaos: unknown scenario {unknown}; known: {known}", file=sys.stderr)
        return 2
    results = run_chaos(
        config,
        scenarios=names,
        profile=args.profile,
        seed=args.seed,
        rate=args.rate or None,
        keep=args.keep,
        emit=lambda r: print(orjson.dumps(r).decode(), flush=True),
    )
    return 0 if all(r.get("pass") for r in results) else 1


def _run_broker(config: Config, stop: threading.Event) -> int:
    from pipeline.broker import EmbeddedBroker
    from pipeline.kafka import ensure_topics

    if not config.kafka.embedded:
        print("streamrec broker: kafka.bootstrap_servers is set; nothing to start", file=sys.stderr)
        return 2
    with EmbeddedBroker(config.broker) as broker:
        created = ensure_topics(config.kafka, broker.bootstrap, config.topics)
        log.info(
            "broker ready on %s, pid %s (topics created: %s)",
            broker.bootstrap,
            broker.pid,
            created or "none new",
        )
        while not stop.wait(0.5):
            if not broker.running():  # a call: the bare method was always truthy
                tail = "\n  ".join(broker.log_tail())
                log.error(
                    "streamrec broker: the embedded broker on %s (pid %s) died, %s; "
                    "every topic, message and offset it held is lost (memory storage). "
                    "Last log lines:\n  %s",
                    broker.bootstrap,
                    broker.pid,
                    broker.exit_status(),
                    tail or "(none)",
                )
                return 1
    return 0


def _run_worker(config: Config, name: str, stop: threading.Event) -> int:
    # A serving role's module (workers/updater.py, ...) exports SPEC and run(); imported only
    # for the command that runs it, so `streamrec tail` never loads torch.
    role = importlib.import_module(f"workers.{name}")
    role.run(config, stop=stop)
    # Everything is drained, committed and closed: skip the interpreter's teardown of torch and
    # transformers, which took 1 s on an idle machine and 6-8 s at load 8-9 after "stopped",
    # against "SIGTERM exits within a few seconds" (measured with `streamrec chaos`).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_tail(config: Config, args: argparse.Namespace, stop: threading.Event) -> int:
    from workers.tail import run as run_tail

    run_tail(
        config,
        max_count=args.max,
        from_beginning=args.from_beginning,
        idle_timeout_s=args.timeout_s,
        stop=stop,
    )
    return 0


def _run_up(config: Config, args: argparse.Namespace, stop: threading.Event) -> int:
    from workers.up import run as run_up

    return run_up(config, stop=stop, bootstrap_dataset=args.bootstrap_dataset)


def _run_bootstrap(config: Config, args: argparse.Namespace) -> int:
    own_files = args.items is not None or args.events is not None
    if own_files and (args.items is None or args.events is None):
        print("streamrec bootstrap: --items and --events go together", file=sys.stderr)
        return 2
    if own_files and args.from_topics:
        print(
            "streamrec bootstrap: --from-topics reads the topics; leave out --items/--events",
            file=sys.stderr,
        )
        return 2
    if own_files or args.from_topics:
        from workers.bootstrap import run_own

        run_own(config, **_flags(args, "items", "events", "from_topics", "announce"))
        return 0
    from workers.bootstrap import run as run_bootstrap

    update = run_bootstrap(config)
    if args.announce:
        from workers.bootstrap import announce_update

        announce_update(config, update)
    return 0


def _run_demo(config: Config, args: argparse.Namespace, stop: threading.Event) -> int:
    from workers.lab.demo import run as run_demo

    return run_demo(config, rate=args.rate, retrain=args.retrain, stop=stop)


if __name__ == "__main__":
    raise SystemExit(main())
