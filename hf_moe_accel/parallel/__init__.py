"""Placement over several GPUs: the predictor's choice, a pipeline over local GPUs (accelerate's
device maps), and expert / tensor / data parallel over torch.distributed."""
