"""`megatron-fold train`: train a MoE model under a folded layout, on any machine.

command.py   the command line: options, validation (exit 2 before any rank starts), compare-layouts
launch.py    ranks: forked on this machine (gloo on CPU, nccl on GPUs) or from torchrun / srun
data.py      the default corpus, byte-level / tokenizer.json tokenisation, Megatron's IndexedDataset
             and GPTDataset
loop.py      Megatron's training step (DDP, optimizer, LR schedule, pipeline schedules)
job.py       one rank's job: model, data, steps, validation, checkpoints, metrics
metrics.py   metrics.jsonl records; plots.py: the PNG plots drawn from them
"""


def silence_library_noise() -> None:
    """Eight ranks repeating each of Megatron's and torch's deprecation notices bury the progress bar
    (`--show-warnings` keeps them)."""
    import logging
    import warnings

    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    logging.getLogger("megatron").setLevel(logging.ERROR)
