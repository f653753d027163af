"""One module per stage, each with `main(script_args, training_args, model_args)`; `run` is the entry point."""

import importlib
import os
import sys

from ..config import STAGES, parse


def run(stage: str, argv: list[str] | None = None) -> None:
    """Parse a recipe and run one stage. Errors in the input print one line and exit 2; set
    PIPELINE_DEBUG=1 (or pass --debug) to see the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("PIPELINE_DEBUG", "") not in ("", "0") or "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        module = importlib.import_module(f"{__name__}.{stage}")
        module.main(*parse(stage, argv))
    except (ValueError, FileNotFoundError, OSError) as error:
        if debug:
            raise
        message = " ".join(str(error).split())
        print(f"error: {stage}: {message} (PIPELINE_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)


__all__ = ["STAGES", "run"]
