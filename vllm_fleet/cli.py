"""`python3 -m vllm_fleet COMMAND`: the fleet's rules for the bash scripts, and the placement table.

    models          check the config document on stdin; its models, for lib.sh's load_config
    plan            place, check and build the commands of a start, for start_all_models.sh
    supervise       own the model servers: start, restart, detect hangs (supervisor.py)
    status          what the supervisor says of each model, for status_all_services.sh
    record          write a launch record for the supervisor, for start_api_server.sh
    print-command   one command as the dry runs print it, for start_api_server.sh
    placement       this host's GPU -> CPU table

lib.sh writes the config document (vllm_fleet/document.py) and reads the answers as NUL-terminated
fields. Exit status: 0 done, 2 the config or the machine is not ready (said on stderr), 1 a bug.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, TextIO

from .commands import command_text, config_line, server_command, shell_word, without_api_keys
from .config import MODEL_KEYS, Fleet, duration_seconds, load_fleet
from .document import DocumentError, encode_fields, read_document
from .machine import binding_notice, look_at_host, machine_problems
from .placement import Place, survey, table_lines
from .restart_policy import RestartPolicy, SettingError
from .run_dir import LaunchRecord, RunDir
from .supervisor import supervise

CONFIG_PREFIX = "vllm_model_configs"  # what the config's problems are prefixed with, for every script


class Exit(Exception):
    """Stop with this status; what went wrong was said already."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def say(stream: TextIO, text: str) -> None:
    """Write text as bytes, so bytes of the config that are not UTF-8 come out as they went in."""
    stream.flush()
    stream.buffer.write(os.fsencode(text))
    stream.buffer.flush()


def read_fleet(stdin: BinaryIO, environ: Mapping[str, str], log_dir: str) -> Fleet:
    fleet, problems = load_fleet(read_document(stdin.read()), environ, log_dir)
    if problems:
        say(sys.stderr, "".join(f"{CONFIG_PREFIX}: {problem}\n" for problem in problems))
        raise Exit(2)
    return fleet


# ---- commands ----------------------------------------------------------------------------------


def command_models(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    fleet = read_fleet(sys.stdin.buffer, environ, args.log_dir)
    values = [
        "VLLM_HOST",
        fleet.settings.host,
        "VLLM_START_INTERVAL",
        fleet.settings.start_interval,
        "models",
        str(len(fleet.models)),
    ]
    for index, model in enumerate(fleet.models):
        for key in MODEL_KEYS:
            values += [f"{index}.{key}", model.value(key)]
        values += [
            f"{index}.log_path",
            "" if model.is_remote else fleet.log_path(model),
            f"{index}.base_url",
            fleet.base_url(model),
            f"{index}.config_line",
            config_line(model),
        ]
    sys.stdout.buffer.write(encode_fields(values))


def command_plan(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    fleet = read_fleet(sys.stdin.buffer, environ, args.log_dir)
    selected: list[int] = args.models
    if any(index >= len(fleet.models) for index in selected):
        raise SystemExit(f"vllm_fleet plan: the config has {len(fleet.models)} models, not {max(selected) + 1}")
    script = [f"cd {shell_word(args.repo)}\n"]
    records: list[str] = []
    if selected:
        view = look_at_host(fleet, selected, simulate=args.simulate)
        problems = machine_problems(fleet, selected, view, simulate=args.simulate, dry_run=args.dry_run)
        if problems:
            say(sys.stderr, "".join(f"{args.prog}: {problem}\n" for problem in problems))
            say(sys.stderr, f"{args.prog}: error: nothing was started\n")
            raise Exit(2)
        notice = None if args.simulate else binding_notice(fleet.variables, view.numactl)
        if notice is not None:
            level, message = notice
            say(sys.stderr, f"{args.prog}: {message}\n" if level == "info" else f"{args.prog}: {level}: {message}\n")
        for index in selected:
            model = fleet.models[index]
            command = server_command(
                model,
                fleet,
                view.places.get(index) or Place(),
                simulate=args.simulate,
                numactl=view.numactl,
                online_count=view.online_count,
                python=args.python,
                environ=environ,
            )
            text = command_text(fleet.log_path(model), command.argv)
            script.append(
                f"# {model.id}: {model.name} on port {model.port}, GPUs {model.gpus or 'none'},"
                f" {command.place_text}\n{text}"
            )
            if args.run_dir:
                run_dir = RunDir(Path(args.run_dir))
                # The key goes to the server in its environment, from the run directory, never on its
                # command line, which every user of the host can read (ps).
                keyed = bool(run_dir.backend_key(model.id, model.api_key))
                run_dir.write_launch_record(
                    LaunchRecord(
                        id=model.id,
                        argv=command.argv,
                        log=fleet.log_path(model),
                        mode="simulated" if args.simulate else "vllm",
                        health_url=f"{fleet.base_url(model)}/health",
                        logged_command=without_api_keys(text).rstrip("\n"),
                        env=dict(environ),
                        idle=model.idle,
                        idle_after=duration_seconds(model.idle_after) or 0.0,
                        base_url=fleet.base_url(model),
                        keyed=keyed,
                    )
                )
            records += [
                str(index),
                command.place_text,
                command.warning,
                without_api_keys(text).rstrip("\n"),
                str(len(command.argv)),
                *command.argv,
            ]
    if args.dry_run:
        say(sys.stdout, "".join(script))
    else:
        sys.stdout.buffer.write(encode_fields(records))


def command_supervise(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    try:
        policy = RestartPolicy.from_environment(environ)
    except SettingError as error:
        say(sys.stderr, f"supervisor: {error}\n")
        raise Exit(2) from error
    raise Exit(supervise(Path(args.run_dir), Path(args.log_dir), policy))


def command_status(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    run_dir = RunDir(Path(args.run_dir))
    lines = []
    for model_id in args.ids:
        status = run_dir.supervised_status(model_id)
        record = run_dir.launch_record(model_id)
        mode = record.mode if record else ""
        if args.failures:
            if status is not None and status.state in ("failed", "restarting"):
                lines.append(f"{model_id}: {status.state}: {status.reason}\n")
                lines += [f"    {line}\n" for line in status.log_tail]
            continue
        url = record.health_url if record else ""
        if status is None:
            values = [model_id, "", "", "", mode, url]
        else:
            values = [model_id, status.state, str(status.restarts), status.last_exit, mode, url]
        # "-" for empty: bash's read takes runs of tabs as one
        lines.append("\t".join(value or "-" for value in values) + "\n")
    say(sys.stdout, "".join(lines))


def command_record(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    RunDir(Path(args.run_dir)).write_launch_record(
        LaunchRecord(
            id=args.id,
            argv=args.words,
            log=args.log,
            mode=args.mode,
            health_url=args.health_url,
            logged_command=" ".join(shell_word(word) for word in args.words),
            env=dict(environ),
        )
    )


def command_print(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    words: list[str] = args.words
    if args.log is None:
        say(sys.stdout, " ".join(shell_word(word) for word in words) + "\n")
    else:
        say(sys.stdout, command_text(args.log, words))


def command_placement(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    placement, problems = survey(args.binding, args.nvidia_smi)
    for problem in problems:
        say(sys.stderr, f"placement: {problem}\n")
    if placement.gpu_problem:
        say(sys.stderr, f"placement: no GPU: {placement.gpu_problem}\n")
    say(sys.stdout, "".join(f"{line}\n" for line in table_lines(placement)))
    if problems:
        raise Exit(1)


# ---- the command line --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm_fleet",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n")[-1],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    log_dir = argparse.ArgumentParser(add_help=False)
    log_dir.add_argument(
        "--log-dir",
        default="logs",
        metavar="DIR",
        help="where relative log= names live (lib.sh's LOG_DIR; default: %(default)s)",
    )

    run_dir = argparse.ArgumentParser(add_help=False)
    run_dir.add_argument("--run-dir", required=True, metavar="DIR", help="the run directory (VLLM_RUN_DIR)")

    models = commands.add_parser(
        "models",
        parents=[log_dir],
        help="check the config document on stdin and print its models",
        description="Read the config document lib.sh writes on stdin. On any static problem print one line "
        f"each, prefixed '{CONFIG_PREFIX}: ', and exit 2; else print VLLM_HOST, VLLM_START_INTERVAL, "
        "'models' (their number) and INDEX.KEY for every key, log_path and base_url of each model, "
        "as NAME VALUE pairs of NUL-terminated fields.",
    )
    models.set_defaults(run=command_models)

    plan = commands.add_parser(
        "plan",
        parents=[log_dir],
        help="place, check and build the commands of a start",
        description="Read the config document on stdin; place the models INDEX... on CPUs, check the machine "
        "(ports, model paths, GPUs, parallel sizes, memory fractions, numactl) and build each "
        "server's command. On any problem print one line each and exit 2. With --dry-run print "
        "the commands as a shell script; else per model the NUL-terminated fields INDEX, "
        "PLACE_TEXT, WARNING, LOGGED_COMMAND, N and the N words of its command.",
    )
    plan.add_argument("models", nargs="*", type=int, metavar="INDEX", help="the models to start, from 0")
    plan.add_argument("--simulate", action="store_true", help="run the simulator in place of vLLM")
    plan.add_argument("--dry-run", action="store_true", help="print the commands (and try no numactl binding)")
    plan.add_argument("--prog", default="start_all_models", help="prefix of the messages (default: %(default)s)")
    plan.add_argument("--python", default="python3", help="python of the simulator (default: %(default)s)")
    plan.add_argument("--repo", default=".", metavar="DIR", help="where the servers start (default: %(default)s)")
    plan.add_argument("--run-dir", metavar="DIR", help="write each model's launch record there (run_dir.py)")
    plan.set_defaults(run=command_plan)

    supervisor = commands.add_parser(
        "supervise",
        parents=[log_dir, run_dir],
        help="own the model servers: start, restart, detect hangs",
        description="Run until SIGTERM (stop_all_models.sh sends it once no model is wanted): start the models "
        "whose want file asks for it, restart those that exit or hang, with the backoff of VLLM_RESTART_* "
        "(docs/fleet.md). One supervisor per run directory: a second one exits at once.",
    )
    supervisor.set_defaults(run=command_supervise)

    status = commands.add_parser(
        "status",
        parents=[run_dir],
        help="what the supervisor says of each model",
        description="Print a tab-separated line per ID: ID, STATE, RESTARTS, LAST_EXIT, MODE, HEALTH_URL (the "
        "last two of its last launch), - for an empty one; STATE, RESTARTS and LAST_EXIT are empty when no "
        "supervisor follows the model's current start. With --failures, instead, the reason "
        "of each failed or restarting model and a failed model's last log lines.",
    )
    status.add_argument("--failures", action="store_true", help="print the failed and restarting models' reasons")
    status.add_argument("ids", nargs="*", metavar="ID")
    status.set_defaults(run=command_status)

    record = commands.add_parser(
        "record",
        parents=[run_dir],
        help="write a launch record for the supervisor",
        description="Write RUN_DIR/ID.launch.json: WORD... run with this environment, output appended to LOG, "
        "/health at HEALTH_URL (run_dir.py).",
    )
    record.add_argument("--id", required=True, help="the service's id (its PID file's name)")
    record.add_argument("--log", required=True, metavar="FILE", help="the file its output is appended to")
    record.add_argument("--mode", required=True, help="the mode its PID file records")
    record.add_argument("--health-url", required=True, metavar="URL", help="what the supervisor checks")
    record.add_argument("words", nargs="+", metavar="WORD")
    record.set_defaults(run=command_record)

    printer = commands.add_parser(
        "print-command",
        help="print one command as the dry runs do",
        description="Print WORD... quoted for a shell where needed. With --log, as a background command with "
        "its output going to FILE, and the words after `env` one a line.",
    )
    printer.add_argument("--log", metavar="FILE", help="the file the command's output goes to")
    printer.add_argument("words", nargs="+", metavar="WORD")
    printer.set_defaults(run=command_print)

    placement = commands.add_parser(
        "placement",
        help="print this host's GPU -> CPU table",
        description="Print the online CPUs, the NUMA nodes and each GPU's share of CPUs, as the models would "
        "be bound; exit 1 when a --binding entry is malformed.",
    )
    placement.add_argument(
        "--binding",
        action="append",
        default=[],
        metavar="GPU=CPUS",
        help="explicit GPU -> CPU list entry (GPU_CPU_BINDING), repeatable",
    )
    placement.add_argument("--nvidia-smi", default="nvidia-smi", help="nvidia-smi command (default: %(default)s)")
    placement.set_defaults(run=command_placement)
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args, os.environ if environ is None else environ)
    except Exit as stop:
        return stop.status
    except DocumentError as exc:
        say(sys.stderr, f"vllm_fleet {args.command}: the config document on stdin is malformed: {exc}\n")
        return 1
    return 0
