"""A whole model with one kernel field set to 'triton' against the same model with torch's ops: the
check every Triton kernel's tests end with."""
import pytest
import torch
import torch.nn.functional as F

from megatron_unipool.kernels.triton_support import triton_runs_on
from megatron_unipool.model import LanguageModel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton kernels run here: compiled on CUDA, or interpreted on a CPU (conftest.py sets TRITON_INTERPRET there)
TRITON_RUNS = triton_runs_on(DEVICE)
# what a test of the grouped_mm expert path computes in: on CUDA torch._grouped_mm takes bf16 operands only
GROUPED_MM_PRECISIONS = ["fp32", "bf16_autocast"]


def use_gemm_tiles(monkeypatch, kernel, **blocks: int) -> None:
    """An autotuned GEMM kernel with one config of these block sizes for the test: the interpreter's configs
    give every block 16 (triton_support.gemm_configs), so a block used where another belongs only shows with
    sizes that differ, as a GPU's do."""
    import triton

    from megatron_unipool.kernels.triton_support import interpreting

    monkeypatch.setattr(kernel, "configs", [triton.Config({**blocks, "UPCAST": interpreting()})])
    monkeypatch.setattr(kernel, "cache", {})  # the tuned choice per key, else kept from earlier calls


def skip_fp32_grouped_mm_on_cuda(precision: str) -> None:
    if precision == "fp32" and DEVICE == "cuda":
        pytest.skip("torch._grouped_mm takes bf16 operands on CUDA: the bf16_autocast case runs there")


def assert_triton_model_equals_torch_model(cfg, field: str, device, after_backward=None, reference: str = "torch",
                                           autocast: bool = False) -> None:
    """One forward and backward of the model `cfg` builds with model.<field> 'triton', then `reference`
    (same seed, same tokens): the same logits and gradients. `after_backward(model, kernel)` runs after
    each backward, for the test's own checks (how often its kernel ran). `autocast`: under bf16 autocast,
    as training runs (a path such as CUDA's grouped_mm experts takes bf16 only), compared to bf16's rounding:
    for a kernel that leaves the forward alone (a rounding apart in the forward flips routing choices)."""
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1)).to(device)
    results = []
    for kernel in ("triton", reference):
        setattr(cfg.model, field, kernel)
        torch.manual_seed(0)
        model = LanguageModel(cfg.model, cfg.moe).to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            logits, losses = model(tokens[:, :-1])
        assert logits.dtype == (torch.bfloat16 if autocast else torch.float32)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        (loss + sum(losses.values(), torch.zeros((), device=device))).backward()
        if after_backward is not None:
            after_backward(model, kernel)
        results.append((logits.detach().float(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    if autocast:  # bf16 sums in another order: relative to each tensor's scale
        logits_tolerance, relative_atol, rtol = dict(rtol=2e-2, atol=2e-2), 2e-2, 2e-2
    else:
        logits_tolerance, relative_atol, rtol = dict(rtol=1e-5, atol=1e-6), 0.0, 1e-4
    torch.testing.assert_close(results[0][0], results[1][0], **logits_tolerance)
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[1][1].items():
        atol = max(1e-6, relative_atol * grad.abs().max().item())
        torch.testing.assert_close(results[0][1][name], grad, rtol=rtol, atol=atol, msg=name)


class RecordedLaunches:
    """Stands in for a Triton kernel (monkeypatched over it): each launch, kernel[grid](...), runs the
    kernel and appends `name` to `launches`."""

    def __init__(self, kernel, name: str, launches: list):
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(self.name)
            return self.kernel[grid](*args, **kwargs)
        return launch
