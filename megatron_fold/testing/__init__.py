"""Testing tools for multi-rank MoE code on gloo, for our tests, benchmarks and users' own models.

multirank.py      run_on_ranks: forked gloo ranks with a hang timeout and per-rank tracebacks
moe_reference.py  tiny MoE configs, full weights, sharded loading and full-gradient gathering, so a
                  multi-rank layer can be compared with a single-rank run
"""
