"""One run per output folder at a time: the first process of a run (global rank 0) holds an exclusive lock on
`<output_dir>/.pipeline.lock` (fcntl, released by the kernel however the process ends, SIGKILL included) and
writes its process id, host, start time and command into it, so that a second run names the one in its way."""

import fcntl
import json
import os
import socket
import sys
import time

LOCK_FILE = ".pipeline.lock"


class OutputDirLocked(ValueError):
    """Another run writes this output_dir."""


class OutputDirLock:
    def __init__(self, output_dir: str):
        self.output_dir, self.path = output_dir, os.path.join(output_dir, LOCK_FILE)
        self.created_dir = self.created_file = False
        self.handle = None

    def acquire(self) -> "OutputDirLock":
        if not os.path.isdir(self.output_dir):
            os.makedirs(self.output_dir)
            self.created_dir = True
        self.created_file = not os.path.exists(self.path)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read()
            handle.close()
            raise OutputDirLocked(f"output_dir {self.output_dir} is being written by another run ({_describe(holder)}): "
                                  "wait for it to end, stop it, or give this run another output_dir (nothing was "
                                  "written)") from None
        handle.seek(0), handle.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "command": " ".join([os.path.basename(sys.executable), *sys.argv])}, handle)
        handle.flush()
        self.handle = handle
        return self

    def release(self, wrote_nothing: bool = False) -> None:
        """Unlock (the file stays, empty: removing it could let two later runs lock two different files);
        `wrote_nothing` (the run failed before writing): a lock file and a folder that this run created are removed
        again (the folder only if nothing else is in it), so a refused run leaves no trace."""
        if self.handle is None:
            return
        self.handle.seek(0), self.handle.truncate()
        if wrote_nothing and self.created_file:
            os.remove(self.path)
            if self.created_dir and not os.listdir(self.output_dir):
                os.rmdir(self.output_dir)
        self.handle.close()
        self.handle = None


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f"process {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet said which"
