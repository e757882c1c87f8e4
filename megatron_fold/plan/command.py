"""`megatron-fold plan` (being written; see issue 4)."""


def add_arguments(parser):
    pass


def run(args):
    raise ValueError("megatron-fold plan is not available yet")
