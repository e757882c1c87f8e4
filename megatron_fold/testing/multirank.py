"""Run a function on N gloo ranks inside one pytest test.

Why fork: importing torch and megatron-core takes seconds; 16 spawned ranks would pay it 16 times on 2
cores. The parent imports everything once (tests/conftest.py) and forks ranks that inherit it.
Rendezvous goes through a FileStore in a fresh temporary directory, so consecutive tests never fight
over a TCP port and the parent runs no store-server thread (forking a threaded process can deadlock);
gloo's own connections use ephemeral ports chosen by the OS.

Failure contract: an exception in any rank fails the test with that rank's number and traceback (the
other ranks are killed, since they are typically blocked in a collective with it); a rank that does
not finish within `timeout` seconds fails the test naming the unfinished ranks; no process survives,
not even when the pytest process itself is killed (each rank asks the kernel for SIGKILL on its
parent's death), nor a process a rank started (each rank leads a process group the parent kills).
"""

from __future__ import annotations

import ctypes
import faulthandler
import multiprocessing as mp
import os
import pickle
import signal
import tempfile
import time
import traceback
from multiprocessing.connection import wait

import torch
import torch.distributed as dist

__all__ = ["run_on_ranks", "MultiRankFailure", "process_alive", "rank_device", "TEST_DEVICE_VARIABLE"]


class MultiRankFailure(AssertionError):
    """A rank raised, or ranks timed out; the message carries every rank's story."""


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this rank when the pytest process dies (killed by CI, a thread-method
    pytest-timeout, Ctrl-C twice): the parent's cleanup never runs then, and ranks blocked in gloo
    would live on. No-op where prctl is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _rank_main(fn, rank, world_size, store_path, conn, stack_file, stack_after, parent_pid, backend, args, kwargs):
    # Its own process group, so the parent can also kill what the rank starts (e.g. a multiprocessing
    # manager process a library spawns), which os._exit below would otherwise leave running.
    os.setpgid(0, 0)
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    status, payload = "ok", None
    # A hung rank writes its Python stack here shortly before the parent gives up on it.
    stack_fh = open(stack_file, "w")
    if stack_after is not None:
        faulthandler.dump_traceback_later(stack_after, file=stack_fh)
    try:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("LOCAL_RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        if backend == "nccl":
            torch.cuda.set_device(rank)  # one GPU per rank on this machine
        else:
            torch.set_num_threads(1)  # N CPU ranks share the cores; oversubscription makes gloo crawl
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
        payload = fn(rank, world_size, *args, **kwargs)
        # A rank that exits while a peer is still finishing the connection handshake of the last
        # group it created makes that peer fail with "connection closed by peer": leave together.
        dist.barrier()
    except BaseException:  # noqa: BLE001 - report everything, SystemExit and KeyboardInterrupt too
        status, payload = "error", traceback.format_exc()
    # Plain pickle, not the Connection's: torch registers shared-memory reductions for tensors with
    # multiprocessing, and the segments would vanish with this process before the parent reads them.
    try:
        message = pickle.dumps((status, payload))
    except Exception:  # result not picklable: report that instead of dying silently
        message = pickle.dumps(("error", f"rank {rank} returned an unpicklable result:\n{traceback.format_exc()}"))
    conn.send_bytes(message)
    conn.close()
    # Skip atexit handlers and pytest's teardown inherited through fork; the parent owns cleanup.
    os._exit(0)


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie has exited and only waits to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _kill(procs):
    """Kill every rank and every process a rank started (each rank leads its own process group)."""
    for p in procs:
        for kill in (lambda: os.killpg(p.pid, signal.SIGKILL), lambda: os.kill(p.pid, signal.SIGKILL)):
            try:
                kill()
            except (ProcessLookupError, PermissionError):
                pass
    for p in procs:
        p.join(timeout=10)


TEST_DEVICE_VARIABLE = "MFOLD_TEST_DEVICE"


def rank_device() -> torch.device:
    """Where multi-rank tests put models and inputs: the CPU (gloo) by default; with
    MFOLD_TEST_DEVICE=cuda (scripts/smoke_8gpu.sh), this rank's GPU (nccl)."""
    kind = os.environ.get(TEST_DEVICE_VARIABLE, "cpu")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"{TEST_DEVICE_VARIABLE}={kind!r}: use cpu or cuda")
    return torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")


def run_on_ranks(fn, world_size: int, *args, timeout: float | None = 120.0, backend: str | None = None,
                 **kwargs) -> list:
    """Call `fn(rank, world_size, *args, **kwargs)` on `world_size` forked ranks.

    Returns the per-rank return values, indexed by rank. `fn` must be a module-level function or a
    closure; results must be picklable (CPU tensors are). `timeout=None` waits as long as the ranks
    run (a training job); a failing rank still stops every rank. `backend="nccl"` gives rank r the
    GPU r (the parent must not have initialised CUDA before forking); the default is nccl when
    MFOLD_TEST_DEVICE=cuda, else gloo.
    """
    if backend is None:
        backend = "nccl" if os.environ.get(TEST_DEVICE_VARIABLE) == "cuda" else "gloo"
    ctx = mp.get_context("fork")
    # Rendezvous through a file in a fresh directory: no port to collide with the previous test, and
    # no store server thread in the parent (forking a process that runs threads can deadlock).
    stacks = tempfile.TemporaryDirectory(prefix="mfold-run-")
    store_path = os.path.join(stacks.name, "store")
    stack_after = max(timeout - 1.0, timeout * 0.8) if timeout is not None else None
    try:
        procs, conns = [], {}
        for rank in range(world_size):
            parent_conn, child_conn = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_rank_main, args=(fn, rank, world_size, store_path, child_conn,
                                                     os.path.join(stacks.name, str(rank)), stack_after, os.getpid(),
                                                     backend, args, kwargs))
            p.start()
            child_conn.close()
            procs.append(p)
            conns[parent_conn] = rank
        results: dict[int, object] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout if timeout is not None else float("inf")
        try:
            grace_set = False
            while conns:
                if errors and not grace_set:
                    # Give the other ranks a moment to report: the first error is often a symptom
                    # (a peer closed its connection) of another rank's real failure.
                    deadline, grace_set = min(deadline, time.monotonic() + 3.0), True
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                for conn in wait(list(conns), timeout=None if left == float("inf") else left):
                    rank = conns.pop(conn)
                    try:
                        status, payload = pickle.loads(conn.recv_bytes())
                    except EOFError:
                        status, payload = "error", f"rank {rank} died without a result (exit code {procs[rank].exitcode})"
                    if status == "ok":
                        results[rank] = payload
                    else:
                        errors[rank] = payload
        finally:
            _kill(procs)
        if errors:
            # Real failures first; "connection closed by peer" errors are usually their echoes.
            order = sorted(errors, key=lambda r: ("closed by peer" in errors[r], r))
            details = "\n".join(f"--- rank {r} ---\n{errors[r]}" for r in order)
            raise MultiRankFailure(f"{len(errors)} of {world_size} ranks raised (first: rank {order[0]}):\n{details}")
        if conns and not errors:
            missing = sorted(conns.values())
            where = "\n".join(f"--- rank {r} stack ---\n{_read(os.path.join(stacks.name, str(r)))}" for r in missing[:4])
            raise MultiRankFailure(
                f"timed out after {timeout:.0f}s: ranks {missing} of {world_size} did not finish "
                f"(a hang, usually a collective some rank never entered); all ranks were killed\n{where}"
            )
        return [results[r] for r in range(world_size)]
    finally:
        stacks.cleanup()


def _read(path: str) -> str:
    """A rank's stack dump, cut where the harness starts (the rest is pytest, inherited by fork)."""
    try:
        with open(path) as f:
            lines = f.read().strip().splitlines()
    except OSError:
        lines = []
    cut = next((i for i, line in enumerate(lines) if "multiprocessing/process.py" in line), len(lines))
    return "\n".join(lines[:cut]) or "(no stack written)"
