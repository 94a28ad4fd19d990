"""Handler worker processes.

A Python process runs one thread of Python at a time, and at concurrency 8 the driver's
handlers kept one core busy while the other waited (docs/benchmarks.md). So the gRPC
server, start-up recovery, metrics, Identity and the streaming SnapshotMetadata calls stay
in the first process (the front), and every unary Controller, GroupController and Node
call goes, as its serialized request, to a worker process. A worker runs the same handler
objects the front would have and sends back the serialized response or the status the call
ended with.

Workers come and go with the load. Each copies pages of the front's heap as it writes to
them (reference counts change on every use), so a worker that has served a few hundred
calls holds several MiB of its own; an idle node should not pay for that. A worker with
nothing to do for `idle_seconds` is told to finish and exits; a call that finds every
worker busy (or none) asks for another, up to `count`. New workers cannot be forked from
the front, whose gRPC threads may hold locks at any instant, so the front forks one small
single-threaded process at start-up, before any thread exists (the spawner), and the
spawner forks each worker and passes the front its end of the worker's socket
(SCM_RIGHTS). Workers so share the pages the front had at start-up, as before.

What keeps this safe: keys in flight are locks on a file (csi_driver.volumes.inflight), so two
processes never work on one volume or snapshot at once; loop devices are claimed by the
kernel (a lost race is retried); nothing else is shared in memory. A worker is only told
to finish when no call is outstanding in it.

A worker that dies unasked (killed for memory, a failpoint in tests), or the spawner,
takes the driver with it: the front SIGKILLs itself, the orchestrator restarts it and
recovery runs as after any crash, which is the one path every operation is built to
survive. A front that dies takes the spawner with it, and the spawner its workers
(PR_SET_PDEATHSIG).

Between front and worker runs a private socket pair: frames of an 8-byte length and a
pickle of (call id, method, bytes) one way and (call id, status name, bytes or detail)
back. Between front and spawner, one pickled record per packet (SOCK_SEQPACKET).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import itertools
import logging
import os
import pickle
import selectors
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import IO, Any, NoReturn

import grpc
from google.protobuf.message import Message

from ..errors import DriverError
from ..host import syscalls
from ..proto import csi_pb2
from .interceptor import status_of

log = logging.getLogger(__name__)

FORWARDED = ("Controller", "GroupController", "Node")
"""Services whose calls run in the workers (all their calls are unary)."""

DEFAULT_IDLE_SECONDS = 10.0
SPAWN_TIMEOUT = 30.0
"""How long a call waits for a worker to start before it fails UNAVAILABLE."""



class Remote(DriverError):
    """A status a handler worker process reported for a call."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code

_SERVING_IMPORTS = ("queue", "concurrent.futures.thread", "grpc._server", "grpc._interceptor")
"""Modules the gRPC server imports only once it is built (after the fork)."""

_HEADER = struct.Struct("!Q")
_PACKET = 4096
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


def _how(wstatus: int) -> str:
    if os.WIFSIGNALED(wstatus):
        return f"was killed by signal {os.WTERMSIG(wstatus)}"
    return f"exited with code {os.waitstatus_to_exitcode(wstatus)}"


def _child(body: Callable[[], None], what: str) -> NoReturn:
    """Run a forked child's body and leave without unwinding into the parent's code."""
    code = 0
    try:
        body()
    except BaseException:
        log.exception("%s failed", what)
        code = 1
    finally:
        os._exit(code)


# -- the worker side ----------------------------------------------------------------------

def _worker_main(sock: socket.socket, services: dict[str, object], parent: int,
                 drop: list[Callable[[], None]]) -> None:
    for close in drop:
        close()
    syscalls.die_with_parent()
    if os.getppid() != parent:
        return  # the spawner died before the line above took effect
    handlers: dict[str, tuple[Handler, type[Message]]] = {}
    for service, obj in services.items():
        for name, (request_cls, _) in _methods(service).items():
            handlers[f"{service}/{name}"] = (getattr(obj, name), request_cls)
    send_lock = threading.Lock()

    def run(call_id: int, method: str, payload: bytes) -> None:
        try:
            handler, request_cls = handlers[method]
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


# -- the spawner --------------------------------------------------------------------------

def _spawner_main(ctl: socket.socket, services: dict[str, object], front: int) -> None:
    """Fork a worker for each index the front sends; report each worker's exit. Single
    threaded, so that forking it is safe. Ends when the front closes its end and the
    workers have exited."""
    syscalls.die_with_parent()
    if os.getppid() != front:
        return
    me = os.getpid()
    children: dict[int, int] = {}  # pidfd -> pid
    sel = selectors.DefaultSelector()
    sel.register(ctl, selectors.EVENT_READ)
    listening = True
    while listening or children:
        for key, _ in sel.select():
            if key.fileobj is ctl:
                try:
                    packet = ctl.recv(_PACKET)
                except OSError:
                    packet = b""
                if not packet:  # the front is stopping; its workers have been told to
                    listening = False
                    sel.unregister(ctl)
                    continue
                index = pickle.loads(packet)
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                pid = os.fork()
                if pid == 0:
                    # Keep only the worker's end of its own socket pair.
                    drop: list[Callable[[], None]] = [sel.close, ours.close, ctl.close,
                                                      *(functools.partial(os.close, fd)
                                                        for fd in children)]
                    _child(functools.partial(_worker_main, theirs, services, me, drop),
                           f"handler worker {index}")
                theirs.close()
                pidfd = os.pidfd_open(pid)
                children[pidfd] = pid
                sel.register(pidfd, selectors.EVENT_READ)
                with contextlib.suppress(OSError):  # the front is gone: PDEATHSIG is coming
                    socket.send_fds(ctl, [pickle.dumps(("started", index, pid))], [ours.fileno()])
                ours.close()
            else:
                pidfd = key.fd
                sel.unregister(pidfd)
                os.close(pidfd)
                pid = children.pop(pidfd)
                _, wstatus = os.waitpid(pid, 0)
                if listening:
                    with contextlib.suppress(OSError):
                        ctl.send(pickle.dumps(("exited", pid, wstatus)))
    sel.close()


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
    idle_since: float = field(default_factory=time.monotonic)
    retiring: bool = False


class WorkerPool:
    """Up to `count` workers, started on demand and stopped after `idle_seconds` idle."""

    def __init__(self, count: int, idle_seconds: float = DEFAULT_IDLE_SECONDS) -> None:
        if count < 1:
            raise ValueError("a worker pool needs at least one worker")
        if not idle_seconds > 0:
            raise ValueError("idle_seconds must be positive")
        self.count = count
        self.idle_seconds = idle_seconds
        self.workers: list[_Worker] = []
        """The workers calls may go to (not those told to finish)."""
        self.started = 0
        """Workers started over the pool's life."""
        self.spawner_pid = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        self._indexes = itertools.count()
        self._next = 0
        self._spawning = 0
        self._retiring: dict[int, _Worker] = {}
        """Workers told to finish, by pid, until the spawner reports their exit (a pid can
        be reused after that)."""
        self._exits: dict[int, int] = {}
        """Exit statuses of workers that died unasked, for their reader's log line."""
        self._closing = False
        self._stop = threading.Event()
        self._ctl: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    def start(self, services: dict[str, object]) -> None:
        """Fork the spawner. Call before the process starts any thread: a fork copies
        only the calling thread, and a lock another thread held would stay held."""
        front = os.getpid()
        # What exists now is shared with the spawner and the workers until written, and a
        # page the front writes afterwards stays behind in the spawner as a private copy.
        # So: import now what serving imports later; drop garbage and give free C heap
        # back; keep the collector's passes from writing to what is left (gc.freeze).
        # Measured: 3 MiB less in each worker after a few hundred calls, and the spawner's
        # own pages 7.1 -> 5.7 MiB.
        for module in _SERVING_IMPORTS:
            importlib.import_module(module)
        gc.collect()
        syscalls.malloc_trim()
        gc.freeze()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            def body() -> None:
                ours.close()
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front decides when to stop
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                _spawner_main(theirs, services, front)
            _child(body, "handler worker spawner")
        theirs.close()
        self.spawner_pid, self._ctl = pid, ours
        for target, name in ((self._read_spawner, "worker-spawner-reader"),
                             (self._retire_idle, "worker-idle")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("handler workers: up to %d processes, started on demand by spawner pid %d "
                 "and stopped after %g s idle", self.count, pid, self.idle_seconds)

    def _choose(self) -> _Worker:
        """The worker with the fewest calls outstanding (ties rotate); ask for another when
        all are busy and there is room, and wait when there is none yet. Lock held."""
        deadline = time.monotonic() + SPAWN_TIMEOUT
        while True:
            if self._closing:
                raise Remote(grpc.StatusCode.UNAVAILABLE, "the driver is stopping")
            best: _Worker | None = None
            n = len(self.workers)
            if n:
                start = self._next % n
                self._next = start + 1
                for i in range(n):
                    w = self.workers[(start + i) % n]
                    if best is None or len(w.pending) < len(best.pending):
                        best = w
            if (best is None or best.pending) and n + self._spawning < self.count:
                self._spawn()
            if best is not None:
                return best
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Remote(grpc.StatusCode.UNAVAILABLE,
                             f"no handler worker started within {SPAWN_TIMEOUT:g} s")
            self._changed.wait(remaining)

    def _spawn(self) -> None:
        assert self._ctl is not None
        try:
            self._ctl.send(pickle.dumps(next(self._indexes)))
        except OSError as exc:  # the spawner is gone; its reader is stopping the driver
            raise Remote(grpc.StatusCode.UNAVAILABLE, f"cannot start a handler worker: {exc}") from None
        self._spawning += 1

    def call(self, method: str, request: Message, response_cls: type[Message]) -> Message:
        waiter = _Waiter()
        with self._lock:
            worker = self._choose()
            call_id = next(self._ids)
            worker.pending[call_id] = waiter
        try:
            try:
                with worker.send_lock:
                    _send(worker.sock, (call_id, method, request.SerializeToString()))
            except OSError as exc:  # the worker is gone; its reader is stopping the driver
                raise Remote(grpc.StatusCode.UNAVAILABLE,
                             f"handler worker {worker.index} is gone: {exc}") from None
            waiter.done.acquire()
        finally:
            with self._lock:
                worker.pending.pop(call_id, None)
                if not worker.pending:
                    worker.idle_since = time.monotonic()
        status, payload = waiter.reply
        if status == "OK":
            assert isinstance(payload, bytes)
            return response_cls.FromString(payload)
        raise Remote(grpc.StatusCode[status], str(payload))

    def busy(self) -> int:
        with self._lock:
            return sum(len(w.pending) for w in self.workers)

    def _read_spawner(self) -> None:
        assert self._ctl is not None
        while True:
            try:
                packet, fds, _, _ = socket.recv_fds(self._ctl, _PACKET, 1)
            except OSError:
                packet, fds = b"", []
            if not packet:
                break
            kind, a, b = pickle.loads(packet)
            if kind == "started":
                worker = _Worker(a, b, socket.socket(fileno=fds[0]))
                t = threading.Thread(target=self._read, args=(worker,),
                                     name=f"worker-{worker.index}-reader", daemon=True)
                with self._changed:
                    self._spawning -= 1
                    self.workers.append(worker)
                    self.started += 1
                    self._changed.notify_all()
                t.start()
                log.debug("started handler worker %d (pid %d)", worker.index, worker.pid)
            else:
                with self._changed:
                    retired = self._retiring.pop(a, None)
                    if retired is None:
                        self._exits[a] = b
                        self._changed.notify_all()
                if retired is not None and b != 0:
                    log.error("idle handler worker %d (pid %d) %s while finishing",
                              retired.index, a, _how(b))
        if self._closing:
            return
        how = "exited"
        with contextlib.suppress(ChildProcessError):
            _, wstatus = os.waitpid(self.spawner_pid, 0)
            how = _how(wstatus)
        self._fatal(f"handler worker spawner (pid {self.spawner_pid}) {how}")

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
        with self._changed:
            if self._closing or worker.retiring:
                worker.sock.close()
                return
            # Unasked: learn how from the spawner, briefly, for the log line.
            self._changed.wait_for(lambda: worker.pid in self._exits, timeout=2.0)
            wstatus = self._exits.pop(worker.pid, None)
        how = "exited" if wstatus is None else _how(wstatus)
        self._fatal(f"handler worker {worker.index} (pid {worker.pid}) {how}")

    @staticmethod
    def _fatal(what: str) -> None:
        log.critical("%s; stopping the driver at once so that it restarts and recovers, as "
                     "after a crash", what)
        os.kill(os.getpid(), signal.SIGKILL)

    def _retire_idle(self) -> None:
        """Tell workers idle for idle_seconds to finish: they see the end of their stream,
        and no call can be sent to them any more."""
        interval = min(1.0, self.idle_seconds / 4)
        while not self._stop.wait(interval):
            now = time.monotonic()
            with self._lock:
                idle = [w for w in self.workers
                        if not w.pending and now - w.idle_since >= self.idle_seconds]
                for w in idle:
                    self.workers.remove(w)
                    w.retiring = True
                    self._retiring[w.pid] = w
            for w in idle:
                log.debug("stopping handler worker %d (pid %d): idle for %g s", w.index, w.pid,
                          self.idle_seconds)
                with contextlib.suppress(OSError):
                    w.sock.shutdown(socket.SHUT_WR)

    def close(self, timeout: float = 30.0) -> None:
        """Tell the workers to finish (end of their stream), then the spawner; reap it."""
        with self._changed:
            self._closing = True
            workers, self.workers = self.workers, []
            self._changed.notify_all()
        self._stop.set()
        for w in workers:
            with contextlib.suppress(OSError):
                w.sock.shutdown(socket.SHUT_WR)
        if self._ctl is not None:
            with contextlib.suppress(OSError):
                self._ctl.shutdown(socket.SHUT_RDWR)
        if not self.spawner_pid:
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, _ = os.waitpid(self.spawner_pid, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                break
            if time.monotonic() > deadline:
                log.warning("handler workers did not stop within %g s; killing them", timeout)
                os.kill(self.spawner_pid, signal.SIGKILL)  # its workers follow (PDEATHSIG)
                os.waitpid(self.spawner_pid, 0)
                break
            time.sleep(0.02)
        for t in self._threads:
            t.join(timeout=1.0)
        if self._ctl is not None:
            self._ctl.close()


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
