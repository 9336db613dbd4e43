"""Our process groups as DeepSpeed's engine and ZeRO ask for them (Megatron's `mpu` interface)."""
from __future__ import annotations

import torch.distributed as dist

from .state import ParallelState, create_groups


class DeepSpeedTopology:
    """Our groups in the shape DeepSpeed's engine and ZeRO ask for (Megatron's `mpu`).

    "Model parallel" is every rank holding a different part of one model replica: the tp ranks
    of every stage (DeepSpeed sums gradient norms over it). Our groups are reused; DeepSpeed needs a
    real group where ours has a single rank (None), so those all become one group of this rank alone,
    which only this rank creates.
    """

    def __init__(self, parallel: ParallelState):
        layout = self.layout = parallel.layout
        timeout = parallel.timeout
        self.own_rank = dist.new_group([layout.rank], timeout=timeout, use_local_synchronization=True)
        self._dp = parallel.dp_group or self.own_rank
        self._tp = parallel.tp_group or self.own_rank
        self._mp = create_groups([layout.ranks(dp=[d]) for d in range(layout.dp)], layout.rank, timeout) or self.own_rank
        self._dp_ranks = layout.ranks(tp=[layout.tp_rank], pp=[layout.pp_rank])
        # DeepSpeed's bf16 (ZeRO-1) and fp16 optimizers sum each expert group's squared gradient norm over the
        # "pipeline" group, then over ep. Stages holding other pools (vanilla, grouped pools) must add each
        # other's, each distinct pool once: the stage at each position of its pool's stage set joins the stages
        # at that position in the other sets. That needs the sets to split the stages into equal parts, which ZeRO
        # with bf16 and pp > 1 makes a config check. UniPool's one set: no group.
        sets = parallel.pool_stage_sets
        self._pipeline, self._pipeline_size = self.own_rank, 1
        split_evenly = sorted(s for stages in sets for s in stages) == list(range(layout.pp))
        if len(sets) > 1 and split_evenly and len({len(stages) for stages in sets}) == 1:
            self._pipeline_size = len(sets)
            self._pipeline = create_groups([[layout.rank_of(t, d, stages[position]) for stages in sets]
                                            for t in range(layout.tp) for d in range(layout.dp)
                                            for position in range(len(sets[0]))], layout.rank, timeout)

    def get_data_parallel_group(self):
        return self._dp

    def get_data_parallel_world_size(self):
        return self.layout.dp

    def get_data_parallel_rank(self):
        return self.layout.dp_rank

    def get_data_parallel_group_ranks(self):
        return self._dp_ranks

    def get_model_parallel_group(self):
        return self._mp

    def get_model_parallel_world_size(self):
        return self.layout.tp * self.layout.pp

    def get_model_parallel_rank(self):
        return self.layout.tp_rank + self.layout.tp * self.layout.pp_rank

    def get_pipeline_model_parallel_group(self):
        return self._pipeline

    def get_pipeline_model_parallel_world_size(self):
        return self._pipeline_size

    def get_pipeline_model_parallel_rank(self):
        return self.layout.pp_rank

    def get_tensor_model_parallel_group(self):
        return self._tp

    def get_tensor_model_parallel_world_size(self):
        return self.layout.tp

    def get_tensor_model_parallel_rank(self):
        return self.layout.tp_rank

    def get_tensor_model_parallel_src_rank(self):
        return self.layout.rank - self.layout.tp_rank
