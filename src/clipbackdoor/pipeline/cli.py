"""Command line: ``python -m clipbackdoor <stage> ...``. It only parses arguments and calls the library.

Stage parameters arrive with ``--params``: either the JSON a Snakemake rule passes (exactly the sections
the rule declares in ``params:``), or ``@FILE:section,section`` (what dvc.yaml uses, so `dvc repro` reads
the current params.yaml). Both are validated against the schema before any work starts. User errors
print one line naming the culprit and the fix, and exit with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from clipbackdoor.errors import EXIT_USER_ERROR, UserError


def parse_params(value: str) -> dict:
    """``--params`` -> nested dict holding just the rule's keys, each validated against its sub-schema.

    Keys are dotted paths into params.yaml ("data.world", "seed"): the JSON form maps each to its value,
    the ``@FILE:key,key`` form reads them from FILE (validated as a whole first)."""
    from clipbackdoor.config import get_dotted, load_yaml, nest_dotted, validate_dotted, validate_params

    if value.startswith("@"):
        path, _, names = value[1:].partition(":")
        full = load_yaml(path)
        validate_params(full, path)
        from clipbackdoor.pipeline.dvcgen import check_graph_shape

        check_graph_shape(full, Path(path).parent / "dvc.yaml")  # the form dvc.yaml's commands use
        flat = {key: get_dotted(full, key) for key in names.split(",") if key}
    else:
        try:
            flat = json.loads(value)
        except json.JSONDecodeError as exc:
            raise UserError(f"--params is neither JSON nor @FILE:keys ({exc})",
                            fix="see `python -m clipbackdoor <stage> --help`") from None
        for key, val in flat.items():
            validate_dotted(key, val, "--params")
    return nest_dotted(flat)


def build_parser() -> argparse.ArgumentParser:
    """The CLI, built from the stage registry (:mod:`clipbackdoor.pipeline.registry`): one subcommand per stage
    and command, with ``--log`` everywhere, ``--params`` where the stage reads parameters and ``--threads`` where it
    runs torch on the CPU."""
    from clipbackdoor import __version__
    from clipbackdoor.pipeline.registry import STAGES

    parser = argparse.ArgumentParser(prog="clipbackdoor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"clipbackdoor {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        sp = sub.add_parser(stage.name, help=stage.help, description=stage.help[:1].upper() + stage.help[1:] + ".")
        sp.set_defaults(stage=stage)
        sp.add_argument("--log", default=None, help="write stdout and stderr to this file")
        if stage.params:
            sp.add_argument("--params", required=True, help="JSON of the rule's param sections, or @FILE:sec,sec")
        for arg in stage.args:
            arg.add_to(sp)
        if stage.threads:
            sp.add_argument("--threads", type=int, default=1,
                            help="torch CPU threads (the rule passes the cores it holds)")
    return parser


def run_stage(args) -> None:
    """Parameters validated and typed, threads set, then the stage's function."""
    from clipbackdoor.config import stage_view
    from clipbackdoor.runtime import set_threads

    stage = args.stage
    params = stage_view(parse_params(args.params)) if stage.params else None
    if stage.threads and stage.name != "finetune":  # (finetune splits its threads among its data-parallel workers)
        set_threads(args.threads)
    stage.load()(args, params)


# (file descriptor of the stderr we had before redirect_to_log, the log's path): a failing stage's one line
# also reaches the terminal that runs Snakemake / DVC, which otherwise shows only "Error in rule X"
_TERMINAL: tuple[int, str] | None = None


def redirect_to_log(path: str) -> None:
    """Send this process's stdout and stderr (Python and native) to ``path``, creating its folder."""
    import os

    global _TERMINAL
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    if _TERMINAL is None:
        _TERMINAL = (os.dup(2), path)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _decoder_errors() -> tuple[type[BaseException], ...]:
    """Exception types of the artifact decoders (tar, image, JSON, Parquet, safetensors): bad bytes, not bugs."""
    import tarfile

    types: list[type[BaseException]] = [tarfile.TarError, json.JSONDecodeError, UnicodeDecodeError]
    for module, name in (("safetensors", "SafetensorError"), ("pyarrow", "ArrowException"),
                         ("PIL", "UnidentifiedImageError")):
        mod = sys.modules.get(module)
        found = getattr(mod, name, None) if mod is not None else None
        if found is None and module == "PIL" and "PIL.Image" in sys.modules:
            found = getattr(sys.modules["PIL.Image"], name, None)
        if isinstance(found, type):
            types.append(found)
    return tuple(types)


def _report_gpu_memory(command: str) -> None:
    """One JSON line with the stage's peak GPU memory (benchmarks/gpu_check.sh collects them from the logs)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak = torch.cuda.max_memory_allocated() / 2**20
        print(json.dumps({"stage": command, "device": torch.cuda.get_device_name(0),
                          "gpu_peak_mib": round(peak, 1)}), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    logging.getLogger().setLevel(logging.ERROR)  # open_clip logs "no pretrained weights" at WARNING
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if getattr(args, "log", None):
        from clipbackdoor.logs import header

        redirect_to_log(args.log)
        print(header(args.command, argv), file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        run_stage(args)
        _report_gpu_memory(args.command)
        _log_footer(args, started, "done")
    except UserError as exc:
        _fail(exc.report(f"clipbackdoor {args.command}"))
        _log_footer(args, started, "failed")
        return EXIT_USER_ERROR
    except _decoder_errors() as exc:  # a reader without its own check met bytes it cannot decode
        if os.environ.get("CLIPBACKDOOR_TRACEBACK") == "1":  # a developer chasing a bug wants the frames
            import traceback

            traceback.print_exc()
        _fail(UserError(f"an input file cannot be read ({type(exc).__name__}: {str(exc)[:200]})",
                        fix="check the files given to this stage (see the command in the log); rerun the stage "
                            "that wrote the damaged one, or `dvc pull` it").report(f"clipbackdoor {args.command}"))
        _log_footer(args, started, "failed")
        return EXIT_USER_ERROR
    except Exception as exc:  # a bug: the traceback goes to the log as usual, its last line to the terminal too
        if _TERMINAL is not None:
            os.write(_TERMINAL[0], f"clipbackdoor {args.command}: failed ({type(exc).__name__}: "
                                   f"{str(exc)[:200]}); traceback in {_TERMINAL[1]}\n".encode())
        raise
    return 0


def _log_footer(args, started: float, status: str) -> None:
    """The log's closing line (stage, status, wall time) when the stage writes a log."""
    if getattr(args, "log", None):
        from clipbackdoor.logs import footer

        sys.stdout.flush()
        print(footer(args.command, time.monotonic() - started, status), file=sys.stderr, flush=True)


def _fail(report: str) -> None:
    """Our error (culprit + fix) to stderr -- the log under --log -- and, when stderr is the log, to the
    terminal as well, with the log's path."""
    print(report, file=sys.stderr)
    if _TERMINAL is not None:
        sys.stderr.flush()
        os.write(_TERMINAL[0], f"{report}\n  (log: {_TERMINAL[1]})\n".encode())
