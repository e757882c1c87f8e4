"""`megatron-fold explain`: JSON holds every group, warnings fire on the right layouts, bad input exits 2."""

import json
import subprocess
import sys

from megatron_fold import FoldedLayout
from megatron_fold.cli import main
from megatron_fold.layout import GROUP_NAMES

MIXTRAL = ["--world", "128", "--gpus-per-node", "8", "--tp", "2", "--pp", "8", "--ep", "8", "--etp", "1"]


def run(capsys, *argv):
    rc = main(["explain", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_json_contains_every_group(capsys):
    rc, out, _ = run(capsys, *MIXTRAL, "--json")
    assert rc == 0
    data = json.loads(out)
    layout = FoldedLayout(128, tp=2, pp=8, ep=8, etp=1)
    assert data["attention_grid"] == {"tp": 2, "cp": 1, "dp": 8, "pp": 8}
    assert data["expert_grid"] == {"etp": 1, "ep": 8, "edp": 2, "pp": 8}
    assert {name: data["groups"][name] for name in GROUP_NAMES} == {n: layout.groups(n) for n in GROUP_NAMES}
    assert data["intra_node"]["tp_ep"] is True and data["intra_node"]["pp"] is False
    assert "--expert-tensor-parallel-size=1" in data["megatron_args"]


def test_rank_view_lists_that_ranks_groups(capsys):
    rc, out, _ = run(capsys, *MIXTRAL, "--rank", "17")
    assert rc == 0
    layout = FoldedLayout(128, tp=2, pp=8, ep=8, etp=1)
    assert f"ep        {layout.group_of('ep', 17)}" in out
    assert "rank 17 (node 2)" in out


def test_warnings(capsys):
    _, out, _ = run(capsys, "--world", "32", "--ep", "16", "--etp", "2", "--tp", "2")
    assert "ETP x EP group (2 x 16 = 32 ranks) crosses nodes" in out
    assert "ETP 2 > 1" in out
    assert "rejects --add-bias-linear for MoE layers unless ETP = 1" in out
    assert "--sequence-parallel" in out
    _, quiet, _ = run(capsys, "--world", "128", "--pp", "8", "--ep", "8", "--num-experts", "8")
    assert "warnings:" not in quiet


def test_invalid_layout_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "megatron_fold.cli", "explain", "--world", "96", "--pp", "8", "--ep", "8"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "EP values that fit: 1, 2, 3, 4, 6, 12" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_rank_outside_world_exits_2(capsys):
    rc, _, err = run(capsys, *MIXTRAL, "--rank", "128")
    assert rc == 2 and "--rank 128 is outside the world of 128 ranks" in err
