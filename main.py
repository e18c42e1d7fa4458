"""Entry point: ``python main.py validate --config configs/itpn_base_minmax.yaml [--debug]``
(or ``test``, ``predict``, ``export``; ``fit`` is refused: lit_ptq does not train).

User errors (a bad path, value or file) end with one sentence on stderr and exit code 2;
``--debug`` shows the traceback instead. SIGTERM is handled like Ctrl-C, so an interrupted
run leaves no results file and no half-written state or ONNX file.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings


# Sleep rather than spin while OpenMP threads wait: on a machine shared with other jobs,
# spinning threads stalled runs up to tenfold, with the same results.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_interrupted: list[int] = []


def _terminate(signum: int, frame: object) -> None:
    _interrupted.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (stderr is kept for warnings and errors)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def _on_global_rank_zero(record: logging.LogRecord) -> bool:
    """Whether this process is global rank 0 (Lightning's rank, from the environment until the
    strategy sets it): the other ranks of a DDP run say the same lines, so they stay quiet."""
    from pytorch_lightning.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _configure_logging() -> None:
    from lit_ptq.run import quiet_lightning

    # Lightning's start-up chatter (seed, accelerators, tips) would bury a one-line error.
    quiet_lightning()
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    package_log = logging.getLogger("lit_ptq")
    if not package_log.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_on_global_rank_zero)
        package_log.addHandler(handler)
        package_log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGINT, signal.SIGTERM)}
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")  # Lightning's own use of old APIs
    from jsonargparse import ArgumentError

    from lit_ptq.cli import cli_main
    from lit_ptq.errors import UserError

    _configure_logging()  # after the imports: importing Lightning resets its logger's level

    try:
        cli_main(argv)
    except (UserError, ArgumentError) as err:
        if debug:
            raise
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit) as err:
        # Lightning turns an interrupt into exit(1) after its own shutdown.
        if isinstance(err, SystemExit) and not _interrupted:
            raise
        name = signal.Signals(_interrupted[-1]).name if _interrupted else "SIGINT"
        print(f"interrupted by {name}: no results, state or ONNX file were written", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
