"""Profiles: shipped ones load and cite a source for every number, a profile round-trips through a file
into `plan --profile`, its numbers change the ranking, and bad files exit 2 naming the problem."""

import dataclasses
import json

import pytest

from megatron_fold.cli import main
from megatron_fold.plan.hardware import GPUS, get_gpu
from megatron_fold.plan.profile import SCHEMA, load_profile

NUMBERS = ("peak_tflops", "memory_gb", "sms", "gemm_max_efficiency", "grouped_gemm_factor", "hbm_gbs",
           "attention", "nvlink_gbs", "network_gbs", "collective_latency_us")


def run(capsys, *argv):
    rc = main(["plan", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_shipped_profiles_cite_every_number():
    assert set(GPUS) == {"h100", "h200", "a100", "b200"}
    for p in GPUS.values():
        assert set(NUMBERS) <= set(p.sources), p.name
        assert all(len(p.sources[n]) > 20 for n in NUMBERS)


def test_round_trip(tmp_path):
    path = tmp_path / "p.json"
    get_gpu("h200").save(str(path))
    assert load_profile(str(path)) == get_gpu("h200")
    assert json.loads(path.read_text())["schema"] == SCHEMA


def test_profile_changes_the_plan(tmp_path, capsys):
    """The same profile through --profile reproduces --gpu; a slow network moves EP inside a node."""
    path = tmp_path / "h100.json"
    get_gpu("h100").save(str(path))
    argv = ["--model", "qwen3-30b-a3b", "--gpus", "32", "--top", "1", "--json"]
    _, by_name, _ = run(capsys, *argv, "--gpu", "h100")
    rc, by_file, _ = run(capsys, *argv, "--profile", str(path))
    assert rc == 0 and json.loads(by_file)["results"] == json.loads(by_name)["results"]
    fast = dataclasses.replace(get_gpu("h100"), network_gbs=400.0)
    slow = dataclasses.replace(get_gpu("h100"), network_gbs=1.0)
    best = {}
    for name, prof in (("fast", fast), ("slow", slow)):
        prof.save(str(path))
        rc, out, _ = run(capsys, *argv, "--profile", str(path))
        best[name] = json.loads(out)["results"][0]["layout"]
    assert best["fast"] != best["slow"]


def test_nvlink_domain_changes_placement(capsys):
    argv = ["--model", "qwen3-30b-a3b", "--gpus", "32", "--gpus-per-node", "4", "--top", "1", "--layout", "ep16"]
    rc, node, _ = run(capsys, *argv)
    rc2, rack, _ = run(capsys, *argv, "--nvlink-domain", "32")
    assert rc == rc2 == 0 and "EP network" in node and "EP NVLink" in rack


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(schema="other/1"), "schema must be 'megatron-fold-profile/1'"),
    (lambda d: d.pop("hbm_gbs"), "missing fields: hbm_gbs"),
    (lambda d: d.update(speed=3), "unknown fields: speed"),
    (lambda d: d.update(network_gbs=-5), "network_gbs must be a positive number, got -5"),
    (lambda d: d.update(gemm_max_efficiency=1.5), "gemm_max_efficiency is a fraction of the peak, at most 1"),
    (lambda d: d.update(attention=[[1024, 500], [512, 400]]), "attention chunk lengths must increase"),
    (lambda d: d.update(attention=[]), "attention must be a non-empty list"),
    (lambda d: d.update(nvlink_domain=0), "nvlink_domain must be a positive integer or null"),
])
def test_bad_profile_exits_2(tmp_path, capsys, edit, message):
    data = get_gpu("h100").to_dict()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    rc, _, err = run(capsys, "--model", "mixtral-8x7b", "--gpus", "8", "--profile", str(path))
    assert rc == 2 and message in err and str(path) in err


def test_unreadable_profile_exits_2(tmp_path, capsys):
    rc, _, err = run(capsys, "--model", "mixtral-8x7b", "--gpus", "8", "--profile", str(tmp_path / "none.json"))
    assert rc == 2 and "cannot read profile" in err
    (tmp_path / "x.json").write_text("{not json")
    rc, _, err = run(capsys, "--model", "mixtral-8x7b", "--gpus", "8", "--profile", str(tmp_path / "x.json"))
    assert rc == 2 and "is not JSON" in err
