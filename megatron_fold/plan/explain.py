"""Why one layout beats another: the step-time terms that decide between two estimates, in words.

`plan` prints this for the best coupled and the best folded layout, where a user would doubt the
ranking ("folding buys nothing here?"): each term's seconds and share of the step on both sides, and
which groups the deciding communication runs over (NVLink or the network)."""

from __future__ import annotations

from megatron_fold.plan.cost import Estimate

__all__ = ["term_differences", "deciding_term", "explain"]

# The group each communication term runs over, and its size on the layout.
_GROUP_OF_TERM = {"tp_comm": ("TP", "tp"), "cp_comm": ("CP", "cp"), "ep_comm": ("EP", "ep"),
                  "etp_comm": ("ETP", "etp"), "pp_comm": ("PP", "pp"), "dp_comm_exposed": ("DP x CP", "dp_cp")}


def term_differences(slower: Estimate, faster: Estimate) -> list[tuple[str, float]]:
    """(term, seconds the slower layout spends on it beyond the faster one), largest first; terms only
    one side has count as zero on the other."""
    terms = set(slower.time_s) | set(faster.time_s)
    diffs = [(t, slower.time_s.get(t, 0.0) - faster.time_s.get(t, 0.0)) for t in terms]
    return sorted(diffs, key=lambda d: (-d[1], d[0]))


def deciding_term(slower: Estimate, faster: Estimate) -> str:
    """The term that costs the slower layout the most over the faster one."""
    return term_differences(slower, faster)[0][0]


def _where(est: Estimate, term: str) -> str:
    if term not in _GROUP_OF_TERM:
        return ""
    label, group = _GROUP_OF_TERM[term]
    layout = est.choice.layout
    size = {"tp": layout.tp, "cp": layout.cp, "ep": layout.ep, "etp": layout.etp, "pp": layout.pp,
            "dp_cp": layout.dp * layout.cp}[group]
    if size <= 1:
        return f" (no {label} group)"
    inside = layout.intra_node(group) if size <= layout.gpus_per_node else False
    return f" ({label} {size} {'inside a node' if inside else 'across nodes'})"


def _share(est: Estimate, term: str) -> str:
    seconds = est.time_s.get(term, 0.0)
    return f"{seconds:.3f} s, {100 * seconds / est.step_time_s:.1f}% of the step{_where(est, term)}"


def explain(coupled: Estimate, folded: Estimate, top: int = 3) -> list[str]:
    """Lines saying which terms decide between the best coupled and the best folded layout."""
    slower, faster = (coupled, folded) if coupled.step_time_s >= folded.step_time_s else (folded, coupled)
    name = {id(coupled): "coupled", id(folded): "folded"}
    gap = slower.step_time_s - faster.step_time_s
    lines = [f"why the {name[id(faster)]} layout is faster ({gap:.3f} s per step, "
             f"{100 * gap / faster.step_time_s:.1f}%), by term (the first decides):"]
    for term, diff in term_differences(slower, faster)[:top]:
        if diff <= 0:
            break
        lines.append(f"  {term}: {_share(slower, term)} in the {name[id(slower)]} layout vs "
                     f"{_share(faster, term)} in the {name[id(faster)]}")
    return lines
