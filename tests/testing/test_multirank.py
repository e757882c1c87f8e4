"""The harness itself: results come back per rank, a raising rank and a hanging rank fail the test."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from megatron_fold.testing.multirank import MultiRankFailure, process_alive, run_on_ranks


def _sum_ranks(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item(), os.getpid()


def test_results_come_back_per_rank():
    out = run_on_ranks(_sum_ranks, 8, timeout=60)
    assert [v for v, _ in out] == [sum(range(8))] * 8
    assert len({pid for _, pid in out}) == 8


def _raise_on_rank_3(rank, world_size):
    if rank == 3:
        raise ValueError("boom from the third rank")
    dist.barrier()  # the others block here until killed


def test_raising_rank_fails_with_its_rank_and_traceback():
    with pytest.raises(MultiRankFailure) as e:
        run_on_ranks(_raise_on_rank_3, 4, timeout=60)
    msg = str(e.value)
    assert "rank 3" in msg and "ValueError: boom from the third rank" in msg and "_raise_on_rank_3" in msg


def _hang_on_rank_1(rank, world_size, pid_file):
    with open(f"{pid_file}.{rank}", "w") as f:
        f.write(str(os.getpid()))
    if rank == 1:
        time.sleep(3600)




def test_hanging_rank_times_out_and_leaves_no_process(tmp_path):
    pid_file = str(tmp_path / "pid")
    start = time.monotonic()
    with pytest.raises(MultiRankFailure, match=r"timed out after 3s: ranks \[0, 1\] of 2") as e:
        run_on_ranks(_hang_on_rank_1, 2, pid_file, timeout=3)
    # The report shows where each rank hung: rank 1 in the test body, rank 0 waiting for it.
    rank1 = str(e.value).split("--- rank 1 stack ---")[1]
    assert "_hang_on_rank_1" in rank1 and "pytest" not in rank1
    assert time.monotonic() - start < 30
    pids = [int(open(f"{pid_file}.{r}").read()) for r in range(2)]
    assert not any(process_alive(p) for p in pids)


def test_consecutive_runs_do_not_collide():
    for _ in range(3):
        assert [v for v, _ in run_on_ranks(_sum_ranks, 4, timeout=60)] == [6.0] * 4


def test_ranks_die_with_a_killed_parent(tmp_path):
    """pytest killed outright (CI's time limit, a thread-method timeout) runs no cleanup: the ranks must
    still go, or they would sit blocked in gloo forever."""
    import signal
    import subprocess
    import sys

    pid_file = str(tmp_path / "pid")
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from megatron_fold.testing.multirank import run_on_ranks; "
         "from tests.testing.test_multirank import _hang_on_rank_1; "
         f"run_on_ranks(_hang_on_rank_1, 2, {pid_file!r}, timeout=600)"],
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    try:
        deadline = time.monotonic() + 120
        while not all(os.path.exists(f"{pid_file}.{r}") and open(f"{pid_file}.{r}").read() for r in range(2)):
            assert time.monotonic() < deadline and parent.poll() is None, "ranks never started"
            time.sleep(0.2)
        pids = [int(open(f"{pid_file}.{r}").read()) for r in range(2)]
        assert all(process_alive(p) for p in pids)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while any(process_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(process_alive(p) for p in pids)


def test_rank_device_follows_mfold_test_device(monkeypatch):
    from megatron_fold.testing.multirank import rank_device

    monkeypatch.delenv("MFOLD_TEST_DEVICE", raising=False)
    assert rank_device() == torch.device("cpu")
    monkeypatch.setenv("MFOLD_TEST_DEVICE", "tpu")
    with pytest.raises(ValueError, match="MFOLD_TEST_DEVICE='tpu': use cpu or cuda"):
        rank_device()
