"""What a run makes the host wait for the device for: on a GPU each such op stalls the host until the
device drains, in an MoE layer once per layer and micro-batch. Recorded on any device (CPU tests
included), by op, in forward and backward alike (a dispatch mode sees the ops autograd runs).

Not seen: copies between devices (`.cpu()`, `.to("cuda")` of a host tensor), which are no-ops where
the run's tensors already are, so a CPU test cannot tell them apart."""
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# values read back to the host: .item()/int()/bool()/float(); nonzero's count; CUDA's bincount and histc read
# the extremes first; torch.equal/allclose answer a bool; the other results' sizes depend on the values
READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.bincount.default, aten.histc.default,
         aten.masked_select.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
         aten.equal.default, aten.allclose.default}
# a tensor made from Python values (torch.tensor, `t[i] = 3`): on a GPU a copy from pageable host memory, which waits
LIFTS = {aten.lift_fresh.default}
MASK_INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default}  # a mask's count sizes the result
MASK_DTYPES = (torch.bool, torch.uint8)
# Tensor methods that read the whole tensor into Python without an op a dispatch mode sees
HOST_COPIES = ("tolist", "numpy")


class HostSyncs(TorchDispatchMode):
    """Within: `seen` names every op that reads a value back to the host or turns Python values into a tensor."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READS or func in LIFTS:
            self.seen.append(str(func))
        elif func in MASK_INDEXING and any(i is not None and i.dtype in MASK_DTYPES for i in args[1]):
            self.seen.append(f"{func} with a mask")
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.seen.append(f"{func} without output_size")
        return func(*args, **kwargs)


@contextlib.contextmanager
def _recording_host_copies(seen: list[str]):
    """Tensor.tolist and .numpy patched on the class for the duration: seen in backward too, where
    function modes are not active."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_COPIES}

    def recorded(name):
        def method(tensor, *args, **kwargs):
            seen.append(f"Tensor.{name}")
            return originals[name](tensor, *args, **kwargs)
        return method

    for name in HOST_COPIES:
        setattr(torch.Tensor, name, recorded(name))
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def host_syncs(run) -> list[str]:
    """The host reads and host-to-tensor copies `run()` makes, by op name."""
    with HostSyncs() as syncs, _recording_host_copies(syncs.seen):
        run()
    return syncs.seen
