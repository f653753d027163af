"""One module per stage, each with `main(script_args, training_args, model_args)`; `run` is the entry point."""

import errno
import importlib
import os
import re
import resource
import sys
import tempfile

from ..config import STAGES, load_recipe, parse, parser, short_help
from . import preemption
from .lock import OutputDirLock
from .preemption import Preempted

# errno -> the cause, for a write that failed (OSError, or safetensors' "os error N", or torch.save)
WRITE_ERRORS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on device",
    errno.EFBIG: "file too large",
    errno.EDQUOT: "disk quota exceeded",
}


def _cause(code: int) -> str:
    cause = WRITE_ERRORS[code]
    if code == errno.EFBIG and resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        cause += " (the file size limit, `ulimit -f`, was reached)"
    return cause


def check_writable(output_dir: str) -> None:
    """Before anything is loaded or trained: output_dir (or, if it does not exist yet, the nearest folder
    above it) must take a new file. A probe file is created and removed; nothing else is touched."""
    path = os.path.abspath(output_dir)
    existing = path
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"output_dir {output_dir}: {existing} is a file, not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".pipeline-write-test-", dir=existing)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        if error.errno not in WRITE_ERRORS:
            raise
        where = output_dir if existing == path else f"{existing} (to create output_dir {output_dir})"
        raise ValueError(f"cannot write to {where}: {_cause(error.errno)}; nothing was trained or written") from None


def describe_write_error(error: BaseException, output_dir: str | None) -> str | None:
    """One line for a write that failed during a stage (permission, read-only, full disk, size limit, quota),
    or None if `error` is not one. safetensors and torch.save raise their own errors, not OSError."""
    code = error.errno if isinstance(error, OSError) else None
    where = getattr(error, "filename", None) or output_dir
    text = str(error)
    if code is None and (found := re.search(r"os error (\d+)", text)):  # safetensors' Rust I/O error
        code = int(found.group(1))
    elif code is None and isinstance(error, RuntimeError) and re.search(
            r"PytorchStreamWriter|inline_container|file write failed", text) and output_dir:
        # torch.save's error does not give the cause: look for it
        free = os.statvfs(output_dir if os.path.isdir(output_dir) else ".")
        if free.f_bavail == 0:
            code = errno.ENOSPC
        elif resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
            code = errno.EFBIG
        else:
            return f"cannot write to {output_dir}: {text.splitlines()[0] if text else type(error).__name__}"
    if code not in WRITE_ERRORS or where is None:
        return None
    inside = output_dir is not None and os.path.commonpath(
        [os.path.abspath(str(where)), os.path.abspath(output_dir)]) == os.path.abspath(output_dir)
    verb = "write to" if inside or code not in (errno.EACCES, errno.EPERM) else "access"
    return f"cannot {verb} {where}: {_cause(code)}"


def run(stage: str, argv: list[str] | None = None) -> None:
    """Parse a recipe and run one stage. Errors in the input print one line and exit 2; set
    PIPELINE_DEBUG=1 (or pass --debug) to see the traceback instead. So does a write that fails (a read-only
    output_dir, a full disk): the line names the path and the cause."""
    argv = list(sys.argv[1:] if argv is None else argv)
    import torch

    if not torch.cuda.is_available():  # what DeepSpeed picks anyway, without its "Setting accelerator to CPU" warning
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    debug = os.environ.get("PIPELINE_DEBUG", "") not in ("", "0") or "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if "--help_all" in argv:
        parser(stage).parse_args_and_config(["--help"])
    if "-h" in argv or "--help" in argv:
        print(short_help(stage, os.path.relpath(sys.argv[0]) if sys.argv[0].endswith(".py") else f"scripts/{stage}.py"))
        sys.exit(0)
    output_dir = None
    lock = None
    handlers = preemption.install(stage)
    try:
        module = importlib.import_module(f"{__name__}.{stage}")
        parsed = parse(stage, argv)
        output_dir = parsed[1].output_dir
        require_output_dir(argv)
        check_writable(output_dir)
        if os.environ.get("RANK", "0") == "0":  # one process per run holds it (rank 0 of machine 0)
            lock = OutputDirLock(output_dir).acquire()
        module.main(*parsed)
    except Preempted as stop:
        if os.environ.get("RANK", "0") == "0":
            print(f"\n{stage}: {preempted_line(stop, output_dir)}", file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\nerror: {stage}: interrupted (Ctrl-C); the checkpoints already in {output_dir or 'output_dir'} are "
              "kept and the same command resumes from the last one", file=sys.stderr)
        sys.exit(130)
    except Exception as error:
        if lock is not None:
            lock.release(wrote_nothing=True)
            lock = None
        message = describe_write_error(error, output_dir)
        if debug or (message is None and not isinstance(error, (ValueError, OSError))):
            raise
        message = message or " ".join(str(error).split())
        print(f"error: {stage}: {message} (PIPELINE_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)
    finally:
        if lock is not None:
            lock.release()
        preemption.restore(handlers)


def require_output_dir(argv: list[str]) -> None:
    """transformers writes to ./trainer_output when no output_dir is given: a run must say where it writes."""
    if any(a == "--output_dir" or a.startswith("--output_dir=") for a in argv):
        return
    path = argv[argv.index("--config") + 1]
    if not (load_recipe(path) or {}).get("output_dir"):
        raise ValueError(f"recipe '{path}' has no output_dir: set output_dir in the recipe or with --output_dir "
                         "(transformers would write to ./trainer_output)")


def preempted_line(stop: Preempted, output_dir: str | None) -> str:
    if stop.checkpoint is not None:
        return (f"stopped by {stop.name} after step {stop.step}: {stop.checkpoint} is written; the same command "
                "resumes from it")
    return (f"stopped by {stop.name} before the next step began (nothing was training); the checkpoints and models "
            f"already in {output_dir or 'output_dir'} are kept and the same command resumes from the last checkpoint")


__all__ = ["STAGES", "run"]
