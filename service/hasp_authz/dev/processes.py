"""Start, watch and stop the child processes of the local stack."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path


class ProcessFailed(RuntimeError):
    """A child process exited or did not become ready. The message names it."""


class ManagedProcess:
    """A child process whose output goes to a log file, stopped with SIGTERM."""

    def __init__(
        self,
        name: str,
        command: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
    ):
        self.name = name
        self.command = command
        self.log_path = log_path
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(self.env or {})},
                # Its own process group, so Ctrl-C in the terminal reaches only
                # the supervisor, which then stops the children in order.
                start_new_session=True,
            )
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_for_port(self, port: int, timeout: float = 20.0) -> None:
        """Wait until 127.0.0.1:``port`` accepts connections. Raises ProcessFailed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise ProcessFailed(
                    f"{self.name} exited with code {self.exit_code} during start-up; "
                    f"see {self.log_path}"
                )
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise ProcessFailed(
            f"{self.name} did not listen on 127.0.0.1:{port} within {timeout} s; "
            f"see {self.log_path}"
        )

    @property
    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` (SIGSTOP, SIGCONT, SIGKILL ...) if the child runs."""
        if self.running:
            assert self.process is not None
            self.process.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> int | None:
        """Send SIGTERM, wait, then SIGKILL. Return the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            # A child stopped with SIGSTOP acts on SIGTERM only once continued.
            self.process.send_signal(signal.SIGCONT)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
