"""Placement over several GPUs: the predictor's choice, a pipeline over local GPUs (accelerate's
device maps), expert / tensor / data parallel over torch.distributed, and loading only a rank's
share of a checkpoint (`loading.load_for_rank`) by the same rule that shards a whole model
(`shards.shard_layout`)."""
