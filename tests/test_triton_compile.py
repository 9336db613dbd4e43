"""Every Triton kernel compiles for Hopper (sm_90) with the installed Triton, no GPU needed.

The other kernel tests run the kernels in Triton's interpreter on a CPU machine, which checks their
arithmetic but never runs the compiler: a kernel the compiler rejects, or one that compiles to slow
code, would first show on a GPU. Here each is compiled as the JIT specialises it at run time (pointers
16-byte aligned; integers that are multiples of 16 where the models' shapes make them so) for the
dtypes training uses, down to the cubin (Triton's bundled ptxas). The compiler does not run in
interpreter mode, which the tests' conftest turns on for CPU machines, so the compiling happens in a
child process without it (this file, run as a script).
"""
import importlib
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def compile_kernels(specs: list[dict]) -> list[dict]:
    """Compile each spec in a child process without the interpreter: what its PTX holds, per spec."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], input=json.dumps(specs), capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    if "skip" in results:
        pytest.skip(results["skip"])
    return results


def spec(module: str, name: str, types: dict[str, str], constants: dict, multiples_of_16=(), warps=4,
         stages=3) -> dict:
    """`types`: each runtime argument's Triton type ("*bf16", "i32", ...); `constants`: the constexprs."""
    return dict(module=module, name=name, types=types, constants=constants, multiples_of_16=list(multiples_of_16),
                warps=warps, stages=stages)


def kernels_module(name: str):
    return importlib.import_module(f"megatron_unipool.kernels.{name}")


def permute_specs(dtype: str) -> list[dict]:
    """kernels/permute.py: fp32 tokens gathered into `dtype` rows, their gradient summed back in fp32."""
    permute = kernels_module("permute")
    blocks = dict(TOP_K=2, BLOCK_ROWS=permute.BLOCK_ROWS, BLOCK_D=permute.MAX_BLOCK_D)
    sum_rows = dict(rows_ptr=f"*{dtype}", gate_ptr="*fp32", row_ptr="*i64", tokens="i32", dim="i32")
    return [
        spec("permute", "_gather_rows_kernel",
             dict(x_ptr="*fp32", slot_ptr="*i64", out_ptr=f"*{dtype}", rows="i32", dim="i32"), blocks, ("dim",)),
        spec("permute", "_sum_rows_kernel", dict(sum_rows, out_ptr=f"*{dtype}"), dict(WEIGHTED=True, **blocks), ("dim",)),
        spec("permute", "_sum_rows_kernel", dict(sum_rows, out_ptr="*fp32"), dict(WEIGHTED=False, **blocks), ("dim",)),
        spec("permute", "_combine_backward_kernel",
             dict(grad_ptr=f"*{dtype}", y_ptr=f"*{dtype}", gate_ptr="*fp32", slot_ptr="*i64", grad_y_ptr=f"*{dtype}",
                  grad_gate_ptr="*fp32", rows="i32", dim="i32"), blocks, ("dim",)),
    ]


def activation_specs(dtype: str) -> list[dict]:
    """kernels/rotary.py and kernels/swiglu.py."""
    rotary, swiglu = kernels_module("rotary"), kernels_module("swiglu")
    swiglu_backward = dict(grad_hidden_ptr=f"*{dtype}", gate_ptr=f"*{dtype}", up_ptr=f"*{dtype}",
                           grad_gate_ptr=f"*{dtype}", grad_up_ptr=f"*{dtype}", hidden_ptr=f"*{dtype}", n="i64")
    return [
        spec("rotary", "_rotary_kernel",
             dict(x_ptr=f"*{dtype}", out_ptr=f"*{dtype}", cos_ptr="*fp32", sin_ptr="*fp32", rows="i32", heads="i32",
                  seq="i32", batch_stride="i32", seq_stride="i32", head_stride="i32", table_stride="i32", sign="fp32"),
             dict(HALF=32, BLOCK_HALF=32, BLOCK_ROWS=rotary.ROWS_PER_PROGRAM)),
        spec("swiglu", "_swiglu_forward_kernel",
             dict(gate_ptr=f"*{dtype}", up_ptr=f"*{dtype}", hidden_ptr=f"*{dtype}", n="i64"), dict(BLOCK=swiglu.BLOCK)),
        spec("swiglu", "_swiglu_backward_kernel", swiglu_backward, dict(WRITE_HIDDEN=True, BLOCK=swiglu.BLOCK)),
        spec("swiglu", "_swiglu_backward_kernel", swiglu_backward, dict(WRITE_HIDDEN=False, BLOCK=swiglu.BLOCK)),
    ]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_elementwise_kernels_compile_for_hopper(dtype):
    assert all(result["cubin_bytes"] > 0 for result in compile_kernels(permute_specs(dtype) + activation_specs(dtype)))


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_cross_entropy_kernels_compile_for_hopper(dtype):
    cross_entropy = kernels_module("cross_entropy")
    specs = []
    for vocab in (50304, 51200):  # the block and warps follow the vocabulary, as the launch picks them
        block = cross_entropy.block_size(vocab)
        warps = cross_entropy._warps(block)
        specs += [
            spec("cross_entropy", "_cross_entropy_forward_kernel",
                 dict(logits_ptr=f"*{dtype}", row_stride="i32", targets_ptr="*i64", losses_ptr="*fp32", row_stats_ptr="*fp32",
                      vocab="i32"), dict(BLOCK=block), ("row_stride", "vocab"), warps),
            spec("cross_entropy", "_cross_entropy_backward_kernel",
                 dict(logits_ptr=f"*{dtype}", row_stride="i32", targets_ptr="*i64", row_stats_ptr="*fp32",
                      grad_losses_ptr="*fp32", grad_losses_stride="i32", grad_ptr=f"*{dtype}", grad_row_stride="i32",
                      vocab="i32"), dict(BLOCK=block), ("row_stride", "grad_row_stride", "vocab"), warps)]
    assert all(result["cubin_bytes"] > 0 for result in compile_kernels(specs))


def test_pool_weight_gradient_gemm_compiles_to_tensor_cores_fed_by_16_byte_copies():
    """Every tile the autotuner may pick, bf16: wgmma, operands loaded with 16-byte asynchronous copies
    (the layers' tensors are 16-byte aligned offsets from the first one's, which the kernel tells the
    compiler; without that hint it loads 2 bytes at a time)."""
    segmented_gemm = kernels_module("segmented_gemm")
    specs = [spec("segmented_gemm", "_segmented_at_b_kernel",
                  dict(a_base="*bf16", a_offsets="*i64", b_base="*bf16", b_offsets="*i64", starts_ptr="*i64",
                       counts_ptr="*i64", out_ptr="*fp32", calls="i32", experts="i32", N="i32", K="i32"),
                  dict(ALIGN=segmented_gemm.ALIGN_BYTES // 2, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r,
                       UPCAST=False, IEEE=False), ("N", "K"), warps, stages)
             for block_n, block_k, block_r, warps, stages in segmented_gemm.GPU_TILES]
    for tile, result in zip(segmented_gemm.GPU_TILES, compile_kernels(specs)):
        assert result["wgmma_bf16"] and result["async_copies"] and not result["two_byte_loads"], tile


def test_expert_gemms_for_few_rows_compile_to_tensor_cores_fed_by_16_byte_copies():
    """kernels/rows_gemm.py, every tile the autotuner may pick, bf16, as the experts call it: forward
    (weights [M, F, D] read transposed: the contraction contiguous) and input gradient (weights read as
    they lie, two products summed). Strides of 1 are constants, as the JIT specialises them."""
    rows_gemm = kernels_module("rows_gemm")
    pointers = {name: "*bf16" for name in ("a_ptr", "b_ptr", "a2_ptr", "b2_ptr", "out_ptr")}
    integers = {name: "i32" for name in ("experts", "N", "K", "K2", "stride_be", "stride_bk", "stride_bn",
                                         "stride_b2e", "stride_b2k", "stride_b2n", "rows_bucket")}
    layouts = {"forward": (dict(stride_bk=1, stride_b2k=1), False), "input gradient": (dict(stride_bn=1, stride_b2n=1), True)}
    specs, labels = [], []
    for layout, (unit_strides, pair) in layouts.items():
        for block_n, block_k, block_s, warps, stages in rows_gemm.GPU_TILES:
            types = {name: kind for name, kind in {**pointers, **integers, "ends_ptr": "*i64"}.items()
                     if name not in unit_strides}
            constants = dict(unit_strides, PAIR=pair, EXPERTS_P2=128, IEEE=False, BLOCK_N=block_n, BLOCK_K=block_k,
                             BLOCK_S=block_s, UPCAST=False)
            multiples = [name for name in integers if name not in unit_strides and name not in ("experts", "rows_bucket")]
            specs.append(spec("rows_gemm", "_rows_grouped_mm_kernel", types, constants, multiples, warps, stages))
            labels.append((layout, block_n, block_k, block_s))
    for label, result in zip(labels, compile_kernels(specs)):
        assert result["wgmma_bf16"] and result["async_copies"] and not result["two_byte_loads"], label


def fp32_gemm_specs(ieee: bool) -> list[dict]:
    """The expert GEMMs with fp32 operands (train.precision=fp32), first tile: the pool's weight gradient,
    and the few-rows forward."""
    segmented_gemm, rows_gemm = kernels_module("segmented_gemm"), kernels_module("rows_gemm")
    block_n, block_k, block_r, warps, stages = segmented_gemm.GPU_TILES[0]
    segmented = spec("segmented_gemm", "_segmented_at_b_kernel",
                     dict(a_base="*fp32", a_offsets="*i64", b_base="*fp32", b_offsets="*i64", starts_ptr="*i64",
                          counts_ptr="*i64", out_ptr="*fp32", calls="i32", experts="i32", N="i32", K="i32"),
                     dict(ALIGN=segmented_gemm.ALIGN_BYTES // 4, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r,
                          UPCAST=False, IEEE=ieee), ("N", "K"), warps, stages)
    block_n, block_k, block_s, warps, stages = rows_gemm.GPU_TILES[0]
    types = {name: "*fp32" for name in ("a_ptr", "b_ptr", "a2_ptr", "b2_ptr", "out_ptr")}
    types.update({name: "i32" for name in ("experts", "N", "K", "K2", "stride_be", "stride_bn", "stride_b2e",
                                            "stride_b2n", "rows_bucket")}, ends_ptr="*i64")
    rows = spec("rows_gemm", "_rows_grouped_mm_kernel", types,
                dict(stride_bk=1, stride_b2k=1, PAIR=False, EXPERTS_P2=128, IEEE=ieee, BLOCK_N=block_n,
                     BLOCK_K=block_k, BLOCK_S=block_s, UPCAST=False), (), warps, stages)
    return [segmented, rows]


def test_fp32_expert_gemms_multiply_in_full_fp32_not_tf32():
    """Triton's tl.dot rounds fp32 operands to TF32 by default; the expert GEMMs pass IEEE for fp32 so
    that train.precision=fp32 with model.expert_gemm=triton computes what torch's fp32 GEMMs do (TF32 stays
    opt-in, as moe.router_tf32). The interpreter ignores the precision: only the compiled code shows it."""
    assert [result["tf32_mma"] for result in compile_kernels(fp32_gemm_specs(ieee=False))] == [True, True]
    assert [result["tf32_mma"] for result in compile_kernels(fp32_gemm_specs(ieee=True))] == [False, False]


class RecordedLaunches:
    """Stands in for a Triton kernel (`kernel[grid](...)`), recording each launch's keyword arguments."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_expert_gemms_ask_for_full_fp32_exactly_when_the_operands_are_fp32(dtype, triton_runs, monkeypatch):
    import torch
    from kernel_models import DEVICE  # compiled kernels take the device's tensors only (the interpreter any)

    segmented_gemm, rows_gemm = kernels_module("segmented_gemm"), kernels_module("rows_gemm")
    recorded = {}
    for module, name in ((segmented_gemm, "_segmented_at_b_kernel"), (rows_gemm, "_rows_grouped_mm_kernel")):
        recorded[name] = RecordedLaunches(getattr(module, name))
        monkeypatch.setattr(module, name, recorded[name])
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    rows = torch.randn(6, 16).to(DEVICE, torch_dtype)
    segmented_gemm.segmented_weight_gradient([rows], [rows], torch.tensor([[2, 4]], device=DEVICE))
    rows_gemm.rows_grouped_mm(rows, torch.randn(2, 16, 16).to(DEVICE, torch_dtype), torch.tensor([2, 6], device=DEVICE))
    assert [launch["IEEE"] for r in recorded.values() for launch in r.launches] == [dtype == "fp32"] * 2


def _compile_for_hopper(item: dict) -> dict:
    """In the child process: one spec compiled for sm_90, and what its PTX holds."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    found = getattr(kernels_module(item["module"]), item["name"])
    jit = found.fn if isinstance(found, triton.runtime.Autotuner) else found
    types, constants = item["types"], item["constants"]
    assert set(types) | set(constants) == set(jit.arg_names), f"{item['name']}'s arguments changed: update the test"
    signature = {name: "constexpr" if name in constants else types[name] for name in jit.arg_names}
    attrs = {(jit.arg_names.index(name),): [["tt.divisibility", 16]]
             for name, kind in types.items() if kind.startswith("*") or name in item["multiples_of_16"]}
    compiled = triton.compile(ASTSource(jit, signature, constexprs=constants, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": item["warps"], "num_stages": item["stages"]})
    ptx = compiled.asm["ptx"]
    return {"cubin_bytes": len(compiled.asm["cubin"]), "wgmma_bf16": "wgmma.mma_async" in ptx and ".bf16.bf16" in ptx,
            "async_copies": "cp.async.cg.shared.global" in ptx, "two_byte_loads": "ld.global.b16" in ptx,
            "tf32_mma": ".tf32" in ptx}


if __name__ == "__main__":
    try:
        results = [_compile_for_hopper(item) for item in json.loads(sys.stdin.read())]
    except RuntimeError as error:  # a Triton without the NVIDIA backend's assembler
        if "ptxas" not in str(error):
            raise
        results = {"skip": f"this Triton cannot assemble for sm_90 here: {error}"}
    print(json.dumps(results))
