"""Entry point: ``python main.py validate --config configs/itpn_base_minmax.yaml [--debug]``.

User errors (a bad path, value or file) end with one sentence on stderr and exit code 2;
``--debug`` shows the traceback instead. SIGTERM is handled like Ctrl-C, so an interrupted
run leaves no results file and no half-written state file.
"""

from __future__ import annotations

import signal
import sys


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    signal.signal(signal.SIGTERM, _terminate)
    from lit_ptq.cli import cli_main
    from lit_ptq.errors import UserError

    try:
        cli_main(argv)
    except UserError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no results were written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
