"""Our process groups as DeepSpeed's engine and ZeRO ask for them (Megatron's `mpu` interface)."""
from __future__ import annotations

from .state import ParallelState, create_groups, group_ranks


class DeepSpeedTopology:
    """Our groups in the shape DeepSpeed's engine and ZeRO ask for (Megatron's `mpu`).

    "Model parallel" is every rank holding a different part of one model replica: the tp ranks
    of every stage (DeepSpeed sums gradient norms over it).
    """

    def __init__(self, parallel: ParallelState):
        layout = self.layout = parallel.layout
        kinds = group_ranks(layout)
        # DeepSpeed needs real groups where ours would have a single rank (None)
        timeout = parallel.timeout
        self._dp = create_groups(kinds["dp"], layout.rank, timeout, single_rank=True)
        self._tp = create_groups(kinds["tp"], layout.rank, timeout, single_rank=True)
        self._mp = create_groups([layout.ranks(dp=[d]) for d in range(layout.dp)], layout.rank, timeout,
                                 single_rank=True)
        self.own_rank = create_groups([[r] for r in range(layout.world_size)], layout.rank, timeout, single_rank=True)
        self._dp_ranks = layout.ranks(tp=[layout.tp_rank], pp=[layout.pp_rank])

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

    def get_tensor_model_parallel_group(self):
        return self._tp

    def get_tensor_model_parallel_world_size(self):
        return self.layout.tp

    def get_tensor_model_parallel_rank(self):
        return self.layout.tp_rank

    def get_tensor_model_parallel_src_rank(self):
        return self.layout.rank - self.layout.tp_rank
