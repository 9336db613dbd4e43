"""Process groups and the communication of tensor, pipeline, data and expert parallelism.

Knows no model: the model package shards itself with these layers and collectives.
"""
from .state import (
    LaunchError,
    Layout,
    ParallelState,
    all_reduce,
    build_parallel_state,
    group_ranks,
    init_distributed_from_env,
    job_position,
)
