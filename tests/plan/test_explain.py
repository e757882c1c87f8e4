"""`plan` explains the best coupled vs the best folded layout by the terms that decide between them."""

import json

import pytest

from megatron_fold.cli import main
from megatron_fold.layout import FoldedLayout
from megatron_fold.plan.cost import Choice, Estimate
from megatron_fold.plan.explain import deciding_term, explain, term_differences


def _estimate(layout, time_s):
    step = sum(time_s.values())
    return Estimate(choice=Choice(layout), step_time_s=step, tokens_per_s_per_gpu=0.0, tflops_per_gpu=0.0, mfu=0.0,
                    memory_gb={}, memory_stage="first", time_s=time_s, fits=True)


def test_the_term_with_the_largest_excess_decides_and_is_placed():
    """Hand-made breakdowns: the coupled layout (EP 8 over two nodes: ranks 0, 2, .., 14) spends 0.5 s more on
    EP traffic and 0.1 s more on ETP; the folded one 0.2 s more on compute. EP decides, with its share of
    each step and where the EP group runs."""
    coupled = _estimate(FoldedLayout(32, tp=2, ep=8, etp=2, num_experts=8),
                        {"compute": 2.0, "ep_comm": 0.8, "etp_comm": 0.2})  # step 3.0 s
    folded = _estimate(FoldedLayout(32, tp=2, ep=8, etp=1, num_experts=8),
                       {"compute": 2.2, "ep_comm": 0.3, "etp_comm": 0.1})  # step 2.6 s
    assert term_differences(coupled, folded) == [("ep_comm", pytest.approx(0.5)), ("etp_comm", pytest.approx(0.1)),
                                                 ("compute", pytest.approx(-0.2))]
    assert deciding_term(coupled, folded) == "ep_comm"
    lines = explain(coupled, folded)
    assert lines[0] == "why the folded layout is faster (0.400 s per step, 15.4%), by term (the first decides):"
    assert lines[1] == ("  ep_comm: 0.800 s, 26.7% of the step (EP 8 across nodes) in the coupled layout vs "
                        "0.300 s, 11.5% of the step (EP 8 inside a node) in the folded")
    assert lines[2].startswith("  etp_comm: 0.200 s, 6.7% of the step (ETP 2 inside a node) in the coupled")
    assert len(lines) == 3  # compute favours the coupled layout: not a reason for the folded one


def test_plan_json_names_the_deciding_term(capsys):
    assert main(["plan", "--model", "qwen2-57b-a14b", "--gpus", "64", "--capacity-factor", "1", "--top", "1",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    coupled, folded = data["best_coupled"], data["best_folded"]
    assert coupled["coupled"] and not folded["coupled"]
    slower, faster = sorted((coupled, folded), key=lambda e: -e["step_time_s"])
    excess = {t: slower["time_s"].get(t, 0.0) - faster["time_s"].get(t, 0.0) for t in slower["time_s"]}
    assert data["deciding_term"] == max(excess, key=excess.get)
    assert data["explanation"][1].startswith(f"  {data['deciding_term']}: ")
