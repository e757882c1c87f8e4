"""Cost model and search behind `megatron-fold plan`."""
