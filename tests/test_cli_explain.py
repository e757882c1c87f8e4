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
    assert layout.group_of("ep", 17) == list(range(16, 24)) and layout.group_of("pp", 17) == list(range(1, 128, 16))
    assert "ep        [16-23]  nodes [2]" in out
    assert "pp        [1,17,...,113]  nodes [0,2,...,14]" in out
    assert "rank 17 (node 2)" in out


def test_json_rank_view(capsys):
    rc, out, _ = run(capsys, *MIXTRAL, "--rank", "17", "--json")
    layout = FoldedLayout(128, tp=2, pp=8, ep=8, etp=1)
    data = json.loads(out)
    assert rc == 0 and data["rank"]["rank"] == 17 and data["rank"]["node"] == 2
    assert data["rank"]["coords"] == layout.rank_coords(17)
    assert data["rank"]["groups"] == {n: layout.group_of(n, 17) for n in GROUP_NAMES}
    assert "groups" in data  # every group stays in the JSON


def test_compact_groups_and_crossing_counts(capsys):
    from megatron_fold.cli import _compact_group

    assert _compact_group([0, 1, 2, 3, 16, 17, 18, 19]) == "[0-3,16-19]"
    assert _compact_group([3, 11, 19, 27]) == "[3,11,...,27]"
    assert _compact_group([0, 8, 9]) == "[0,8-9]" and _compact_group([5]) == "[5]"
    # EP 16 over 8-GPU nodes: every EP group spans 2 nodes; TP 16 with CP 2: 16 of 16 TP x CP groups
    # of 32 ranks span 4 nodes.
    _, out, _ = run(capsys, "--world", "512", "--tp", "16", "--cp", "2", "--ep", "16", "--etp", "1")
    assert "EP        groups of   16 ranks: CROSSES NODES (32 of 32 groups, spanning up to 2 nodes)" in out
    assert "TP x CP   groups of   32 ranks: CROSSES NODES (16 of 16 groups, spanning up to 4 nodes)" in out


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


def test_order_warnings_follow_the_groups(capsys):
    # tp-dp-pp ends with pp: the default order's groups, no EDP == DP restriction, plain arguments.
    rc, out, _ = run(capsys, "--world", "16", "--tp", "2", "--pp", "2", "--etp", "1", "--order", "tp-dp-pp", "--json")
    data = json.loads(out)
    assert rc == 0 and not any("does not end with pp" in w for w in data["warnings"])
    assert "--use-tp-pp-dp-mapping" not in data["megatron_args"]
    # An order Megatron-LM cannot select: no arguments, and a warning that says why.
    _, out, _ = run(capsys, "--world", "8", "--tp", "2", "--cp", "2", "--ep", "2", "--etp", "2",
                    "--order", "cp-tp-ep-dp-pp")
    assert "Megatron-LM arguments: none select this order" in out
    assert "builds groups neither Megatron-LM order builds" in out
    assert "(folded)" in out  # ETP groups [0, 1] are not the TP groups [0, 2]


def test_error_names_what_the_user_set(capsys):
    """--tp 0 without --etp: ETP follows TP, so the error speaks of tp=0 only, not of an etp=0 never set."""
    rc, _, err = run(capsys, "--world", "8", "--tp", "0")
    assert rc == 2 and "got tp=0" in err and "etp" not in err
    rc, _, err = run(capsys, "--world", "8", "--tp", "0", "--etp", "0")
    assert rc == 2 and "got tp=0, etp=0" in err
    rc, _, err = run(capsys, "--world", "128", "--tp", "3", "--pp", "8", "--ep", "8")
    assert rc == 2 and "ETP*EP*PP = 3*8*8 = 192 (ETP not set: it follows TP 3)" in err


def test_sequence_parallel_is_in_the_printed_arguments(capsys):
    """The TP > 1 advice about --sequence-parallel is followed by the arguments explain prints."""
    rc, out, _ = run(capsys, "--world", "16", "--tp", "2", "--ep", "4", "--etp", "1", "--json")
    data = json.loads(out)
    assert rc == 0 and "--sequence-parallel" in data["megatron_args"]
    assert not any("unless --sequence-parallel is set" in w for w in data["warnings"])
    assert any("TP 2 > 1 with sequence parallelism" in w for w in data["warnings"])
    rc, out, _ = run(capsys, "--world", "16", "--ep", "4", "--json")
    assert rc == 0 and "--sequence-parallel" not in json.loads(out)["megatron_args"]
