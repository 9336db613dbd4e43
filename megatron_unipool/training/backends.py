"""How gradients become an update: the built-in AdamW, or DeepSpeed's engine with ZeRO 0/1/2.

Both take this rank's loss share per micro-batch (`backward`), then `reduce` reduces the
gradients over their replicas and `step` clips by the global norm and updates, unless the norm (or the
step's loss) is not finite: then the update is skipped, on every rank alike. Both read and write the
optimizer state as full-model tensors by parameter name, so checkpoints do not depend on the
backend or the layout.

DeepSpeed sees our process groups through `DeepSpeedTopology` (its `mpu` interface). Pool
parameters are DeepSpeed "expert" parameters whose expert-data-parallel group is the pool group
of `ParallelState`: every replica of the shard in every stage that uses the pool, so ZeRO
reduces (and partitions) them across stages too and the pool stays identical everywhere.
DeepSpeed averages gradients over the data-parallel size, so it is given the loss share times dp
(`loss_scale`, applied where the loss arises so that gradients crossing stages carry it once).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import Config
from ..config.ds_config import deepspeed_config
from ..model import ExpertPool
from ..model.sharding import REPLICATED, ShardSpec
from ..parallel import ParallelState
from ..parallel.deepspeed_mpu import DeepSpeedTopology
from .distributed import OPTIMIZER_KEY, clip_gradients, reduce_gradients
from .optimizer import build_optimizer, decay_groups, set_learning_rate

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def adam_step(value, group: dict, param: torch.Tensor) -> torch.Tensor:
    """An AdamW `step` where torch's keeps it (torch.optim.Adam._init_group): on the parameter's device for
    the fused and capturable kernels, which read it there, on the host otherwise."""
    on_device = group.get("fused") or group.get("capturable")
    return torch.tensor(float(value), dtype=torch.float32, device=param.device if on_device else "cpu")


class NativeBackend:
    """AdamW on every rank (no optimizer-state sharding); our own reductions and clipping."""

    def __init__(self, model: nn.Module, config: Config, specs: dict[str, ShardSpec], parallel: ParallelState,
                 optimizer: Optional[torch.optim.Optimizer] = None):
        self.model, self.config, self.specs, self.parallel = model, config, specs, parallel
        self.optimizer = optimizer or build_optimizer(model, config.train)  # DeepSpeedBackend passes its engine's
        self.activation_dtype = torch.float32  # what travels between pipeline stages
        self.loss_scale = 1.0  # applied to each micro-batch's loss share before the pipeline's backward

    def set_lr(self, lr: float) -> None:
        set_learning_rate(self.optimizer, lr)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def reduce(self) -> None:
        reduce_gradients(self.model, self.specs, self.parallel)

    def step(self, skip: bool = False) -> tuple[float, bool]:
        """Clip the reduced gradients and update unless `skip` or the norm is not finite.

        Returns (global gradient norm before clipping, whether the update was applied); the norm is
        global, so every rank takes the same decision.
        """
        norm = clip_gradients(self.model, self.specs, self.parallel, self.config.train.grad_clip)
        if skip or not math.isfinite(norm):
            return norm, False
        self._update()
        return norm, True

    def _update(self) -> None:
        self.optimizer.step()

    def model_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's weights and buffers at full precision, by full-model name."""
        return dict(self.model.state_dict())

    def load_state(self, full_model: dict[str, torch.Tensor], full_optimizer: dict[str, dict]) -> None:
        """After the weights were loaded into the full model before sharding: the optimizer's part."""
        self.load_optimizer_state(full_optimizer)

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's optimizer state by OPTIMIZER_KEY name (same shapes as the parameters, or scalars)."""
        return {OPTIMIZER_KEY.format(name=name, key=key): value
                for name, param in self.model.named_parameters() for key, value in self.optimizer.state.get(param, {}).items()}

    def load_optimizer_state(self, full_state: dict[str, dict]) -> None:
        """Give each local parameter its slice of the saved full-model optimizer state."""
        groups = {param: group for group in self.optimizer.param_groups for param in group["params"]}
        for name, param in self.model.named_parameters():
            if name in full_state:
                spec = self.specs.get(name, REPLICATED)
                self.optimizer.state[param] = {
                    key: adam_step(value, groups[param], param) if key == "step"
                    else (spec.take(value) if value.dim() else value).clone().to(param.device)
                    for key, value in full_state[name].items()
                }


def pool_group_name(stages: tuple[int, ...]) -> str:
    return "pool_stages_" + "_".join(map(str, stages))


@contextmanager
def _expert_pools_count_as_moe_layers():
    """DeepSpeed enables its expert-gradient handling when the model holds its own MoE class;
    our pools are the expert layers here."""
    import deepspeed.runtime.engine as ds_engine

    original = ds_engine.MoE
    ds_engine.MoE = ExpertPool
    try:
        yield
    finally:
        ds_engine.MoE = original


class DeepSpeedBackend(NativeBackend):
    """`deepspeed.initialize` owns the optimizer: ZeRO stage 0, 1 or 2 from the config."""

    def __init__(self, model: nn.Module, config: Config, specs: dict[str, ShardSpec], parallel: ParallelState,
                 micro_batches: int):
        import deepspeed
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
        from deepspeed.utils import groups

        layout = parallel.layout
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)  # wraps our group
        topology = DeepSpeedTopology(parallel)
        for name, param in model.named_parameters():
            spec = specs.get(name, REPLICATED)
            # count each distinct slice once in DeepSpeed's gradient norm (see DeepSpeedTopology): tp shards on
            # every tp rank, replicated tensors on tp rank 0 only; pool shards are replicated over tp too
            param.model_parallel = (spec.dim is not None and spec.pool_stages is None) or layout.tp_rank == 0
            if spec.pool_stages is not None:
                group_name = pool_group_name(spec.pool_stages)
                param.allreduce, param.group_name = False, group_name
                groups._EXPERT_PARALLEL_GROUP[group_name] = parallel.ep_group or topology.own_rank
                groups._EXPERT_DATA_PARALLEL_GROUP[group_name] = parallel.pool_group(spec.pool_stages) or topology.own_rank
        param_groups = split_params_into_different_moe_groups_for_optimizer(decay_groups(model, config.train))
        with _expert_pools_count_as_moe_layers():
            self.engine, optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=build_optimizer(model, config.train, param_groups), mpu=topology,
                dist_init_required=False, config=deepspeed_config(config, micro_batches))
        super().__init__(model, config, specs, parallel, optimizer)
        # ZeRO and bf16 keep fp32 master weights and moments in their own partitions
        self.partitioned = hasattr(next(model.parameters()), "_hp_mapping")
        self.activation_dtype = torch.bfloat16 if config.train.precision == "bf16" else torch.float32
        self.loss_scale = float(layout.dp)  # DeepSpeed averages over data-parallel ranks; we hand it sums
        self.zero_stage, self.micro_batches, self.backward_calls = config.deepspeed.zero_stage, micro_batches, 0
        # BF16_Optimizer (bf16 with fp32 gradient accumulation at stage 1) adds the bf16 gradients into its
        # fp32 ones after every backward and expects them cleared before the next; the trainer calls the
        # model itself (pipeline stages), not engine.forward, whose output hook would clear them
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

        self.clears_bf16_grads = isinstance(self.optimizer, BF16_Optimizer)

    def zero_grad(self) -> None:
        self.engine.zero_grad()
        self.backward_calls = 0

    def backward(self, loss: torch.Tensor) -> None:
        """ZeRO stages 0/1 accumulate only: reducing inside the last backward would make that pipeline stage
        wait for the pool's replicas in pipeline stages still running their own backward (a deadlock under
        1F1B). ZeRO stage 2 reduces in every backward anyway (so it needs pp = 1); its last one is the boundary."""
        last = self.backward_calls == self.micro_batches - 1
        self.engine.set_gradient_accumulation_boundary(self.zero_stage == 2 and last)
        self.backward_calls += 1
        if self.clears_bf16_grads:  # what engine.forward's output hook would do: each backward adds its own
            self.optimizer.clear_lp_grads()
        self.engine.backward(loss, scale_wrt_gas=False)

    def reduce(self) -> None:
        """After every stage's last backward: the accumulation boundary, where DeepSpeed reduces."""
        if self.zero_stage < 2:
            self.engine.set_gradient_accumulation_boundary(True)
            self.engine.allreduce_gradients()

    def step(self, skip: bool = False) -> tuple[float, bool]:
        if self.zero_stage > 0:
            # the reduced gradients live in ZeRO's partitions: ZeRO clips, and skips (on every rank) an
            # update whose gradient norm is not finite, which is what a non-finite loss gives; `skip`
            # cannot stop it without corrupting ZeRO's gradient buffers, so its decision is reported
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            norm = float(norm) if norm is not None else float("nan")
            return norm, self.engine.was_step_applied()
        # stage 0: gradients are whole on every replica, and DeepSpeed's own norm would average the
        # expert shards' norms over data-parallel ranks instead of summing them: clip as the built-in does
        return super().step(skip)

    def _update(self) -> None:
        self.engine.step()

    def model_tensors(self) -> dict[str, torch.Tensor]:
        tensors = super().model_tensors()
        if self.partitioned:
            from deepspeed.utils import safe_get_full_fp32_param

            masters = {}
            # every name of a tied weight too (the output layer's is the embedding's), or the state dict
            # keeps the bf16 copy under the second name; one gather each, in the same order on every rank
            for name, param in self.model.named_parameters(remove_duplicate=False):
                if id(param) not in masters:
                    masters[id(param)] = safe_get_full_fp32_param(param)
                tensors[name] = masters[id(param)]
        return tensors

    def load_state(self, full_model: dict[str, torch.Tensor], full_optimizer: dict[str, dict]) -> None:
        if self.partitioned:  # the masters were made from the (maybe bf16) weights: restore them exactly
            from deepspeed.utils import safe_set_full_fp32_param

            for name, param in self.model.named_parameters():
                spec = self.specs.get(name, REPLICATED)
                safe_set_full_fp32_param(param, spec.take(full_model[name]).to(param.device, torch.float32))
        self.load_optimizer_state(full_optimizer)

    def _link_moments(self) -> None:
        """Point every parameter's fragment at its AdamW moments, creating empty ones before the first step.

        DeepSpeed 0.19 links the fragments after the first parameter group's first update, so the
        other groups' fragments never see their moments; linking again fixes that.
        """
        base = self.optimizer.optimizer
        for group in base.param_groups:
            for flat in group["params"]:
                if not base.state.get(flat):
                    base.state[flat] = {"step": adam_step(0, group, flat), "exp_avg": torch.zeros_like(flat),
                                        "exp_avg_sq": torch.zeros_like(flat)}
        self.optimizer._hp_optimizer_states_linked = False
        self.optimizer._lazy_init_hp_params_optimizer_state()

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        if not self.partitioned:
            return super().optimizer_tensors()
        from deepspeed.utils import safe_get_full_optimizer_state

        self._link_moments()
        tensors = {}
        for name, param in self.model.named_parameters():  # collectives: same order on every rank
            for key in ADAM_MOMENTS:
                tensors[OPTIMIZER_KEY.format(name=name, key=key)] = safe_get_full_optimizer_state(param, key)
        step = next(iter(self.optimizer.optimizer.state.values()))["step"]
        for name, _ in self.model.named_parameters():
            tensors[OPTIMIZER_KEY.format(name=name, key="step")] = step
        return tensors

    def load_optimizer_state(self, full_state: dict[str, dict]) -> None:
        if not self.partitioned:
            return super().load_optimizer_state(full_state)
        from deepspeed.utils import safe_set_full_optimizer_state

        self._link_moments()
        for name, param in self.model.named_parameters():
            if name not in full_state:  # no saved state (an upcycled or imported model): fresh moments, as natively
                continue
            spec = self.specs.get(name, REPLICATED)
            for key in ADAM_MOMENTS:
                safe_set_full_optimizer_state(param, spec.take(full_state[name][key]).to(param.device), key)
        if not full_state:
            return
        step = next(iter(full_state.values()))["step"]
        for group in self.optimizer.optimizer.param_groups:  # ZeRO's flat partitions
            for flat in group["params"]:
                self.optimizer.optimizer.state[flat]["step"] = adam_step(step, group, flat)

def build_backend(model: nn.Module, config: Config, specs: dict[str, ShardSpec], parallel: ParallelState,
                  micro_batches: int) -> NativeBackend:
    if config.deepspeed.enabled:
        return DeepSpeedBackend(model, config, specs, parallel, micro_batches)
    return NativeBackend(model, config, specs, parallel)
