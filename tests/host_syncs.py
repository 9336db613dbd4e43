"""What a run makes the host wait for the device for: on a GPU each such op stalls the host until the
device drains, in an MoE layer once per layer and micro-batch. Recorded on any device (CPU tests
included), by op, in forward and backward alike (a dispatch mode sees the ops autograd runs)."""
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# values read back to the host: .item()/int()/bool()/float(); nonzero's count; CUDA's bincount reads the largest
# value first; the other results' sizes depend on the values
READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.bincount.default, aten.masked_select.default,
         aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default}
# a tensor made from Python values (torch.tensor, `t[i] = 3`): on a GPU a copy from pageable host memory, which waits
LIFTS = {aten.lift_fresh.default}
MASK_INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default}  # a mask's count sizes the result


class HostSyncs(TorchDispatchMode):
    """Within: `seen` names every op that reads a value back to the host or turns Python values into a tensor."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READS or func in LIFTS:
            self.seen.append(str(func))
        elif func in MASK_INDEXING and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.seen.append(f"{func} with a boolean mask")
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.seen.append(f"{func} without output_size")
        return func(*args, **kwargs)


class _ToList(TorchFunctionMode):
    """Tensor.tolist, which reaches no op a dispatch mode sees (forward only: function modes skip backward)."""

    def __init__(self, seen: list[str]):
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:
            self.seen.append("Tensor.tolist")
        return func(*args, **(kwargs or {}))


def host_syncs(run) -> list[str]:
    """The host reads and host-to-tensor copies `run()` makes, by op name."""
    with HostSyncs() as syncs, _ToList(syncs.seen):
        run()
    return syncs.seen
