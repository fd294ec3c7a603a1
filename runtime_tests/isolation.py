"""Native runtimes (llama.cpp, onnxruntime) run in a worker process, so that their crash is an error.

A SIGILL in a kernel compiled for instructions the CPU traps (llama.cpp's AMX tiles in some
Sapphire Rapids VMs), or a SIGSEGV on a corrupt file, kills the process that made the call. Every
runtime call of ``verify``, ``eval``, ``generate`` and the parity step of ``gguf``/``onnx`` goes
through :class:`Worker`: the runtime object is built in a child process (``python -m
runtime_tests.isolation``) that imports only the runtime, and its methods are called over a pipe.
When the child dies, the caller gets :class:`RuntimeCrash`, one line naming the runtime, the
signal, the likely cause and the command that fixes it, while everything the command already
wrote stays on disk.

Parent -> child: ``("new", "module:Class", args, kwargs)``, then ``("call" | "stream", method,
args, kwargs)`` or ``("close",)``. Child -> parent: ``("ok", value)``, ``("item", value)`` ...
``("end", None)`` for a stream, or ``("error", message)``.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Callable, Iterator

from d2quant.errors import D2Error


class RuntimeCrash(D2Error):
    """The runtime's process died (a signal or a hard exit) while doing something for us."""


@dataclass(frozen=True)
class Runtime:
    """What a crash message says about one runtime: its name and how to repair its install."""

    name: str
    repair: Callable[[], str]  # the exact command that rebuilds / reinstalls it for this machine


_CAUSES = {
    signal.SIGILL: "illegal instruction: the library was compiled for CPU instructions this machine "
                   "traps (llama.cpp's AMX tile kernels do in some Sapphire Rapids VMs)",
    signal.SIGSEGV: "memory fault: a corrupt or truncated model file, or a bug in the runtime",
    signal.SIGBUS: "bus error: the model file changed or was truncated while mapped",
    signal.SIGABRT: "the runtime aborted on an internal check (its message is above)",
    signal.SIGKILL: "killed, usually by the kernel's out-of-memory killer: free memory or use a "
                    "smaller context",
    signal.SIGFPE: "arithmetic fault inside the runtime",
}


def crash_message(runtime: Runtime, returncode: int, doing: str) -> str:
    """One line: what crashed, the likely cause, the repair command."""
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
            what = f"{sig.name}"
        except ValueError:
            sig, what = None, f"signal {-returncode}"
        cause = _CAUSES.get(sig, "a native crash inside the runtime")
    else:
        sig, what, cause = None, f"exit status {returncode}", "the runtime exited without answering"
    fix = runtime.repair()
    if sig == signal.SIGILL:
        advice = f"rebuild it for this CPU: {fix}"
    elif sig == signal.SIGKILL:
        advice = "if memory is not the cause, reinstall it: " + fix
    else:
        advice = f"check the file (re-export it); if it persists, reinstall: {fix}"
    return f"{runtime.name} crashed ({what}) while {doing}; likely cause: {cause}; {advice}"


def _child_env() -> dict[str, str]:
    """The child imports what the parent can: the same sys.path (editable installs, tests)."""
    env = dict(os.environ)
    paths = [p for p in sys.path if p]
    env["PYTHONPATH"] = os.pathsep.join(paths + [env["PYTHONPATH"]] if env.get("PYTHONPATH") else paths)
    return env


class Worker:
    """A runtime object living in a child process; ``call``/``stream`` run its methods there."""

    def __init__(self, factory: str, *args, runtime: Runtime, label: str, **kwargs):
        self.runtime, self.label = runtime, label
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "runtime_tests.isolation", str(to_child_r), str(from_child_w)],
                pass_fds=(to_child_r, from_child_w), env=_child_env(), stdin=subprocess.DEVNULL)
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self._send_conn = Connection(to_child_w, readable=False)
        self._recv_conn = Connection(from_child_r, writable=False)
        self._closed = False
        self.info = self._request(("new", factory, args, kwargs), f"loading {label}")

    # ---- protocol ---------------------------------------------------------------------------
    def _died(self, doing: str) -> RuntimeCrash:
        rc = self._proc.wait()
        self._closed = True
        self._close_pipes()
        return RuntimeCrash(crash_message(self.runtime, rc, doing))

    def _send(self, msg, doing: str) -> None:
        if self._closed:
            raise D2Error(f"{self.runtime.name} session for {self.label} is closed")
        try:
            self._send_conn.send(msg)
        except (BrokenPipeError, OSError):
            raise self._died(doing) from None

    def _recv(self, doing: str):
        try:
            kind, value = self._recv_conn.recv()
        except (EOFError, OSError):
            raise self._died(doing) from None
        if kind == "error":
            raise D2Error(value)
        return kind, value

    def _request(self, msg, doing: str):
        self._send(msg, doing)
        return self._recv(doing)[1]

    def call(self, method: str, *args, **kwargs):
        return self._request(("call", method, args, kwargs), f"running {method} on {self.label}")

    def stream(self, method: str, *args, **kwargs) -> Iterator:
        doing = f"running {method} on {self.label}"
        self._send(("stream", method, args, kwargs), doing)
        done = False
        try:
            while True:
                kind, value = self._recv(doing)
                if kind == "end":
                    done = True
                    return
                yield value
        except D2Error:
            done = True  # the child ended the stream with an error, or died
            raise
        finally:
            while not done:  # the caller stopped early: drain, so the next call reads its own answer
                done = self._recv(doing)[0] == "end"

    def _close_pipes(self) -> None:
        for c in (self._send_conn, self._recv_conn):
            try:
                c.close()
            except OSError:
                pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._send_conn.send(("close",))
        except OSError:
            pass
        self._close_pipes()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# ---- the child --------------------------------------------------------------------------------

def _build(factory: str, args, kwargs):
    module, _, name = factory.partition(":")
    return getattr(importlib.import_module(module), name)(*args, **kwargs)


def _describe(obj) -> dict:
    describe = getattr(obj, "describe", None)
    return describe() if callable(describe) else {}


def serve(recv: Connection, send: Connection) -> None:
    """The child's loop: build the object, then answer calls until told to close (or EOF)."""
    obj = None
    while True:
        try:
            msg = recv.recv()
        except EOFError:
            return
        if msg[0] == "close":
            return
        try:
            if msg[0] == "new":
                obj = _build(*msg[1:])
                send.send(("ok", _describe(obj)))
            elif msg[0] == "call":
                send.send(("ok", getattr(obj, msg[1])(*msg[2], **msg[3])))
            elif msg[0] == "stream":
                for item in getattr(obj, msg[1])(*msg[2], **msg[3]):
                    send.send(("item", item))
                send.send(("end", None))
            else:
                send.send(("error", f"unknown worker request {msg[0]!r}"))
        except D2Error as e:
            send.send(("error", str(e)))
        except Exception as e:  # the runtime's own exception: one line, its type and message
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            send.send(("error", f"{type(e).__name__} in the runtime: {first}"))


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False))
