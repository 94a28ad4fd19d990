"""Handler worker processes.

A Python process runs one thread of Python at a time, and at concurrency 8 the driver's
handlers kept one core busy while the other waited (docs/benchmarks.md). So the gRPC
server, start-up recovery, metrics, Identity and the streaming SnapshotMetadata calls stay
in the first process (the front), and every unary Controller and Node call goes, as its
serialized request, to one of N worker processes forked from the front after recovery.
A worker runs the same handler objects the front would have (with the baton, as in one
process) and sends back the serialized response or the status the call ended with.

What keeps this safe: keys in flight are locks on a file (csi_driver.inflight), so two
processes never work on one volume or snapshot at once; loop devices are claimed by the
kernel (a lost race is retried); nothing else is shared in memory.

A worker that dies (killed for memory, a failpoint in tests) takes the driver with it:
the front SIGKILLs itself, the orchestrator restarts it and recovery runs as after any
crash, which is the one path every operation is built to survive. A front that dies
takes its workers with it (PR_SET_PDEATHSIG).

The pipe between them is a private socket pair: frames of an 8-byte length and a pickle
of (call id, method, bytes) one way and (call id, status name, bytes or detail) back.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import pickle
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import IO, Any

import grpc
from google.protobuf.message import Message

from . import baton, linuxapi
from .errors import Remote, status_of
from .proto import csi_pb2

log = logging.getLogger(__name__)

FORWARDED = ("Controller", "Node")
"""Services whose calls run in the workers (all their calls are unary)."""

_HEADER = struct.Struct("!Q")
Handler = Callable[[Any, Any], Any]


def _message_class(name: str) -> type[Message]:
    cls: type[Message] = getattr(csi_pb2, name)
    return cls


def _methods(service: str) -> dict[str, tuple[type[Message], type[Message]]]:
    """method name -> (request class, response class)."""
    desc = csi_pb2.DESCRIPTOR.services_by_name[service]
    return {m.name: (_message_class(m.input_type.name), _message_class(m.output_type.name))
            for m in desc.methods}


def _send(sock: socket.socket, obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv(stream: IO[bytes]) -> Any:
    """The next frame, or None at end of stream."""
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)


# -- the worker side ----------------------------------------------------------------------

def _worker_main(sock: socket.socket, services: dict[str, object], parent: int) -> None:
    linuxapi.die_with_parent()
    if os.getppid() != parent:
        return  # the front died before the line above took effect
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    handlers: dict[str, tuple[Handler, type[Message]]] = {}
    for service, obj in services.items():
        for name, (request_cls, _) in _methods(service).items():
            handlers[f"{service}/{name}"] = (getattr(obj, name), request_cls)
    send_lock = threading.Lock()

    def run(call_id: int, method: str, payload: bytes) -> None:
        try:
            handler, request_cls = handlers[method]
            with baton.held():
                response = handler(request_cls.FromString(payload), None)
            reply = (call_id, "OK", response.SerializeToString())
        except Exception as exc:
            code, detail = status_of(exc, method)
            reply = (call_id, code.name, detail)
        with send_lock, contextlib.suppress(OSError):
            _send(sock, reply)

    pool = futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="rpc")
    stream = sock.makefile("rb")
    while (frame := _recv(stream)) is not None:
        pool.submit(run, *frame)
    pool.shutdown(wait=True)


# -- the front side -----------------------------------------------------------------------

class _Waiter:
    """One call's reply slot: a lock the caller blocks on until the reader releases it."""

    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = threading.Lock()
        self.done.acquire()
        self.reply: tuple[str, bytes | str] = ("UNKNOWN", "")


@dataclass
class _Worker:
    index: int
    pid: int
    sock: socket.socket
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    pending: dict[int, _Waiter] = field(default_factory=dict)


class WorkerPool:
    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError("a worker pool needs at least one worker")
        self.count = count
        self.workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._next = 0
        self._closing = False

    def start(self, services: dict[str, object]) -> None:
        """Fork the workers. Call before the process starts any thread: a fork copies
        only the calling thread, and a lock another thread held would stay held."""
        front_pid = os.getpid()
        # What exists now is shared with the workers until written. Keep the collector's
        # passes in the workers from writing to all of it (measured: 3 MiB less memory
        # per worker after a few hundred calls).
        gc.collect()
        gc.freeze()
        for index in range(self.count):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            pid = os.fork()
            if pid == 0:  # the worker
                code = 0
                try:
                    ours.close()
                    for w in self.workers:
                        w.sock.close()
                    _worker_main(theirs, services, front_pid)
                except BaseException:
                    log.exception("handler worker %d failed", index)
                    code = 1
                finally:
                    os._exit(code)
            theirs.close()
            self.workers.append(_Worker(index, pid, ours))
        for w in self.workers:
            threading.Thread(target=self._read, args=(w,), name=f"worker-{w.index}-reader",
                             daemon=True).start()
        log.info("started %d handler worker processes: %s", self.count,
                 ", ".join(str(w.pid) for w in self.workers))

    def _pick(self) -> _Worker:
        """The worker with the fewest calls outstanding (ties rotate)."""
        n = len(self.workers)
        start = self._next
        self._next = (start + 1) % n
        best = self.workers[start]
        for i in range(1, n):
            w = self.workers[(start + i) % n]
            if len(w.pending) < len(best.pending):
                best = w
        return best

    def call(self, method: str, request: Message, response_cls: type[Message]) -> Message:
        waiter = _Waiter()
        with self._lock:
            worker = self._pick()
            call_id = next(self._ids)
            worker.pending[call_id] = waiter
        try:
            with worker.send_lock:
                _send(worker.sock, (call_id, method, request.SerializeToString()))
            waiter.done.acquire()
        finally:
            with self._lock:
                worker.pending.pop(call_id, None)
        status, payload = waiter.reply
        if status == "OK":
            assert isinstance(payload, bytes)
            return response_cls.FromString(payload)
        raise Remote(grpc.StatusCode[status], str(payload))

    def busy(self) -> int:
        with self._lock:
            return sum(len(w.pending) for w in self.workers)

    def _read(self, worker: _Worker) -> None:
        stream = worker.sock.makefile("rb")
        try:
            while (frame := _recv(stream)) is not None:
                call_id, status, payload = frame
                with self._lock:
                    waiter = worker.pending.get(call_id)
                if waiter is not None:
                    waiter.reply = (status, payload)
                    waiter.done.release()
        except OSError:
            pass
        if self._closing:
            return
        how = "exited"
        with contextlib.suppress(ChildProcessError):
            _, wstatus = os.waitpid(worker.pid, 0)
            how = (f"was killed by signal {os.WTERMSIG(wstatus)}" if os.WIFSIGNALED(wstatus)
                   else f"exited with code {os.waitstatus_to_exitcode(wstatus)}")
        log.critical("handler worker %d (pid %d) %s; stopping the driver at once so that it "
                     "restarts and recovers, as after a crash", worker.index, worker.pid, how)
        os.kill(os.getpid(), signal.SIGKILL)

    def close(self, timeout: float = 30.0) -> None:
        """Tell the workers to finish (end of their stream) and reap them."""
        self._closing = True
        for w in self.workers:
            with contextlib.suppress(OSError):
                w.sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for w in self.workers:
            while True:
                try:
                    pid, _ = os.waitpid(w.pid, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid:
                    break
                if time.monotonic() > deadline:
                    log.warning("handler worker %d (pid %d) did not stop; killing it", w.index, w.pid)
                    os.kill(w.pid, signal.SIGKILL)
                    os.waitpid(w.pid, 0)
                    break
                time.sleep(0.02)
            w.sock.close()


class Proxy:
    """Stands in for a servicer in the front: each call goes to a worker."""

    def __init__(self, pool: WorkerPool, service: str) -> None:
        self._pool = pool
        self._service = service
        self._methods = _methods(service)

    def __getattr__(self, name: str) -> Handler:
        if name.startswith("_") or name not in self._methods:
            raise AttributeError(name)
        method = f"{self._service}/{name}"
        response_cls = self._methods[name][1]

        def forward(request: Any, _context: Any) -> Any:
            return self._pool.call(method, request, response_cls)
        return forward
