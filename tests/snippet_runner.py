"""Run a code snippet as a fresh interpreter would, without paying for ``import torch`` each time.

``python -c CODE`` starts an interpreter and imports torch (about 2.5 s of CPU here) for every one of
the docs' snippets. Here a fork server that has imported torch and gradxform once (and nothing else:
no test module, no jax, no compiled frames) forks one child per snippet; the child runs the code as
``__main__`` with its stdout and stderr sent to files, exactly what a fresh ``python -c`` would print.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["torch", "gradxform"])


@dataclass(frozen=True)
class Finished:
    """What the child left: its exit code and everything it wrote to stdout and stderr."""

    returncode: int
    stdout: str
    stderr: str


def _child(code: str, cwd: str, out: str, err: str) -> None:
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    status = 0
    try:
        exec(compile(code, "<snippet>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        status = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(status)


def run_fresh(code: str, cwd: Path, timeout: float) -> Finished:
    """Run ``code`` in a forked child of the pre-imported server, in ``cwd``; a child still running
    after ``timeout`` seconds is killed (return code -9, the timeout said in stderr)."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        proc = _CONTEXT.Process(target=_child, args=(code, str(cwd), out, err))
        proc.start()
        proc.join(timeout)
        timed_out = proc.is_alive()
        if timed_out:
            proc.kill()
            proc.join()
        read = lambda p: Path(p).read_text(errors="replace") if os.path.exists(p) else ""  # noqa: E731
        stderr = read(err) + (f"\n(killed after {timeout} s)" if timed_out else "")
        return Finished(-9 if timed_out else proc.exitcode, read(out), stderr)
