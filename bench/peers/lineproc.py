"""A subprocess that answers one JSON line per command line, with a timeout on every answer.

The peers' --serve / `serve` modes use it: the bench keeps the peer loaded and asks for one repetition at
a time, so it can interleave the peer's repetitions with its own (ABAB...). A peer that stalls (GOMP's
spinning barriers can, under load) is killed when an answer does not come in time.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import tempfile
import time
from typing import Any


class PeerExited(RuntimeError):
    """The process ended (or printed something that is not JSON) instead of answering."""


class LineProcess:
    def __init__(self, cmd: list[str], env: dict[str, str] | None = None, label: str = ""):
        self.label = label or os.path.basename(cmd[0])
        # stderr to a file, not a pipe: a chatty peer (llama.cpp logs while loading) would fill a pipe nobody
        # reads until it fails, and block
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, env=env)
        self._buf = b""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def read(self, timeout: float) -> dict[str, Any]:
        """The next line starting with '{', parsed (other lines, e.g. a library's chatter, are skipped)."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    self.close(kill=True)
                    raise subprocess.TimeoutExpired(self.label, timeout)
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.close(kill=True)
                    raise PeerExited(f"{self.label} exited {self.proc.returncode}: {self.stderr_tail()}")
                self._buf += chunk
            line, _, self._buf = self._buf.partition(b"\n")
            if line.startswith(b"{"):
                try:
                    return json.loads(line)
                except json.JSONDecodeError as exc:
                    self.close(kill=True)
                    raise PeerExited(f"{self.label} printed {line[:200]!r}") from exc

    def ask(self, command: str, timeout: float) -> dict[str, Any]:
        try:
            self.proc.stdin.write(command.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError) as exc:
            self.close(kill=True)
            raise PeerExited(f"{self.label} is gone ({exc})") from None
        return self.read(timeout)

    def stderr_tail(self, chars: int = 600) -> str:
        try:
            self._err.seek(0)
            return self._err.read().decode(errors="replace").strip()[-chars:]
        except (OSError, ValueError):
            return ""

    def close(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            try:
                if kill:
                    self.proc.kill()
                else:
                    self.proc.stdin.close()  # end of input: the peer exits
                self.proc.wait(timeout=30)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream and not stream.closed:
                    stream.close()
            except OSError:
                pass
