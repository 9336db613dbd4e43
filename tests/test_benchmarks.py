"""The benchmark scripts run and write the rows their docs promise (tiny sizes; timings are not checked,
byte counts are: they follow from the shapes)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kernel_models import TRITON_RUNS  # where the scripts run Triton kernels, as they decide it

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(tmp_path, script: str, *arguments: str, status: int = 0, cwd=None):
    """benchmarks/SCRIPT ARGUMENTS --json FILE: (the finished process, the rows it wrote), its exit status checked."""
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *arguments, "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=cwd)
    assert done.returncode == status, done.stderr[-2000:]
    return done, json.loads(out.read_text())


def config_overrides(*overrides: str) -> list[str]:
    return [item for override in overrides for item in ("--set", override)]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_moe_layer_benchmark_writes_one_row_per_measurement(tmp_path, dtype):
    done, rows = run_benchmark(tmp_path, "moe_layer.py", "--tokens", "64", "128", "--experts", "4", "--hidden", "32",
                               "--ffn", "64", "--repeats", "1", "--warmup", "0", "--dtype", dtype, "--top-k", "1", "2",
                               cwd=tmp_path)
    impls = ["ours", "ours_grouped_mm", "deepspeed", "loop", "dense", "routing", "routing_norm"]
    impls += ["ours_triton"] if TRITON_RUNS else []  # where Triton runs: compiled on CUDA, interpreted here
    assert sorted((r["top_k"], r["impl"], r["tokens"]) for r in rows) == sorted(
        (k, impl, tokens) for k in (1, 2) for impl in impls for tokens in (64, 128))

    def twin(row, impl):
        return next(r for r in rows if (r["impl"], r["tokens"], r["top_k"]) == (impl, row["tokens"], row["top_k"]))

    for routing in (r for r in rows if r["impl"].startswith("routing")):  # a part of our layer, not compared with DeepSpeed
        assert routing["share_of_ours"] == pytest.approx(routing["ms"] / twin(routing, "ours")["ms"])
        assert routing["vs_deepspeed"] is None
    for row in (r for r in rows if not r["impl"].startswith("routing")):  # each against DeepSpeed at its own top-k
        assert row["vs_deepspeed"] == pytest.approx(row["tokens_per_second"] / twin(row, "deepspeed")["tokens_per_second"])
    assert all("share_of_ours" not in r for r in rows if not r["impl"].startswith("routing"))
    for row in rows:
        assert "error" not in row, row
        assert {"impl", "tokens", "experts", "top_k", "hidden", "tokens_per_second", "device"} <= set(row)
        assert row["experts"] == 4 and row["hidden"] == 32 and row["tokens_per_second"] > 0
        assert row["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
        # every vs_deepspeed ratio depends on DeepSpeed's capacity factor: its rows and the header say which
        assert row.get("capacity_factor") == (1.25 if row["impl"] == "deepspeed" else None)
    assert "vs deepspeed" in done.stdout and "DeepSpeed's layer at capacity factor 1.25" in done.stdout


def test_the_timing_harness_times_the_forward_and_its_backward_only():
    """No loss of its own: a loss computed from the output (fp32 copy, square, mean and their backward)
    made about half of an elementwise kernel's row. The backward starts from one fixed output gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from script_modules import load_script

    measurement = load_script(REPO / "benchmarks" / "measurement.py")
    runs = []  # the ops of each run, from its forward on

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if runs:
                runs[-1].append(func.overloadpacket.__name__)
            return func(*args, **kwargs)

    weight = torch.randn(8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)

    def forward(x):
        runs.append([])
        return x * weight

    with Ops():
        measurement.time_forward_backward(forward, [weight], x, repeats=2, warmup=0)
    assert len(runs) == 3  # one warm-up run at least: it makes the output gradient
    computed = [sorted(op for op in ops if op not in ("view", "detach")) for ops in runs]  # views, gradient storing
    assert computed[1] == computed[2] == ["mul", "mul", "mul", "sum"], runs  # the forward; both gradients
    grad_out = x.grad / weight  # d(x * w)/dx = grad_out * w
    torch.testing.assert_close(weight.grad, (grad_out * x).sum(0))


def test_moe_layer_benchmark_times_the_fused_router_by_name(tmp_path):
    """routing_fused / routing_norm_fused: the routing half with the router compiled, each a share of ours."""
    _, rows = run_benchmark(tmp_path, "moe_layer.py", "--tokens", "64", "--experts", "4", "--hidden", "32", "--ffn",
                            "64", "--repeats", "1", "--warmup", "1", "--impls", "ours", "routing_fused",
                            "routing_norm_fused")
    assert [row["impl"] for row in rows] == ["ours", "routing_fused", "routing_norm_fused"]
    for row in rows[1:]:
        assert "error" not in row, row
        assert row["share_of_ours"] == pytest.approx(row["ms"] / rows[0]["ms"])


def test_moe_layer_benchmark_reports_a_failed_shape_and_measures_the_rest(tmp_path):
    """An expert width grouped_mm cannot take (not 16-byte aligned) fails that one measurement only."""
    done, (failed, measured) = run_benchmark(tmp_path, "moe_layer.py", "--tokens", "64", "--experts", "4", "--hidden",
                                             "32", "--ffn", "6", "--repeats", "1", "--warmup", "0", "--impls",
                                             "ours_grouped_mm", "loop")
    assert failed["impl"] == "ours_grouped_mm" and "expert_gemm='grouped_mm' is not available" in failed["error"]
    assert "tokens_per_second" not in failed
    assert measured["impl"] == "loop" and measured["tokens_per_second"] > 0 and "error" not in measured
    assert "failed: KernelUnavailableError" in done.stdout


def test_grouped_gemm_benchmark_compares_each_backend_with_dense(tmp_path):
    done, rows = run_benchmark(tmp_path, "grouped_gemm.py", "--rows", "96", "--experts", "4", "--hidden", "32",
                               "--ffn", "16", "--balance", "skewed", "--repeats", "1", "--warmup", "0")
    assert {r["impl"] for r in rows} >= {"dense", "loop"}
    for row in rows:
        assert row["rows"] == 96 and row["experts"] == 4 and row["tflops"] > 0 and row["balance"] == "skewed"
    assert next(r for r in rows if r["impl"] == "dense")["vs_dense"] == 1.0
    assert "vs dense" in done.stdout
    assert ("triton" in {r["impl"] for r in rows}) == TRITON_RUNS
    for row in rows:  # dense, grouped_mm and triton also in two parts, each a third of the FLOPs (18 x rows x hidden x ffn)
        phased = row["impl"] in ("dense", "grouped_mm", "triton")
        assert ("fwd_ms" in row and "wgrad_ms" in row) == phased, row
        if phased:
            assert row["fwd_ms"] > 0 and row["wgrad_ms"] > 0
            for part in ("fwd", "wgrad"):
                assert row[f"{part}_tflops"] == pytest.approx(6 * 96 * 32 * 16 / (row[f"{part}_ms"] / 1e3) / 1e12)

    sys.path.insert(0, str(REPO / "benchmarks"))
    from grouped_gemm import expert_counts

    for balance in ("uniform", "skewed"):
        counts = expert_counts(1001, 8, balance)
        assert len(counts) == 8 and sum(counts) == 1001
    assert max(expert_counts(1001, 8, "uniform")) - min(expert_counts(1001, 8, "uniform")) == 1
    assert expert_counts(10000, 8, "skewed")[0] > 2 * expert_counts(10000, 8, "skewed")[-1]


def test_grouped_gemm_benchmark_keeps_the_rows_when_a_part_fails(tmp_path, monkeypatch):
    """The forward / weight-gradient parts are timed after each row: one that fails (out of memory, a kernel
    refusing a shape) is recorded on its row, and every shape is still measured and compared with dense."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import grouped_gemm

    phase_seconds = grouped_gemm.phase_seconds

    def failing_for_dense(impl, rows, *args):
        if impl == "dense":  # no message at all for the second shape: a bare assert in a kernel's path
            raise RuntimeError("out of memory\nsecond line") if rows == 64 else AssertionError()
        return phase_seconds(impl, rows, *args)

    monkeypatch.setattr(grouped_gemm, "phase_seconds", failing_for_dense)
    out = tmp_path / "rows.json"
    grouped_gemm.main(["--rows", "64", "128", "--experts", "4", "--hidden", "32", "--ffn", "16", "--repeats", "1",
                       "--warmup", "0", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [row["rows"] for row in rows if row["impl"] == "dense"] == [64, 128]
    assert all("vs_dense" in row and "error" not in row for row in rows)
    for row in rows:
        if row["impl"] == "dense":
            assert row["phase_error"] == {64: "RuntimeError: out of memory", 128: "AssertionError: "}[row["rows"]]
            assert "fwd_ms" not in row
        else:
            assert "phase_error" not in row and ("fwd_ms" in row) == (row["impl"] in grouped_gemm.PHASED)


def test_grouped_gemm_benchmark_measures_a_pool_shared_by_layers(tmp_path):
    """--layers: every layer's rows count in the FLOPs; the deferred weight gradients are measured both
    ways, and every GEMM in Triton, where Triton runs (here in its interpreter, which conftest.py turns on)."""
    done, rows = run_benchmark(tmp_path, "grouped_gemm.py", "--rows", "48", "--experts", "4", "--hidden", "32",
                               "--ffn", "16", "--layers", "3", "--repeats", "1", "--warmup", "0")
    triton = ["grouped_mm+wgrad_triton", "triton"] if TRITON_RUNS else []
    assert [r["impl"] for r in rows] == ["dense", "loop", "grouped_mm"] + triton
    for row in rows:
        assert row["layers"] == 3 and "error" not in row
        assert row["tflops"] == pytest.approx(18 * 32 * 16 * 3 * 48 / (row["ms"] / 1e3) / 1e12)
    assert "a pool shared by 3 layers" in done.stdout


def test_triton_kernels_benchmark_compares_each_kernel_with_torch(tmp_path):
    """Both implementations of each kernel where Triton runs (on a CPU in its interpreter, which
    conftest.py turns on); the least traffic follows from the shapes."""
    if not TRITON_RUNS:
        pytest.skip("Triton is not installed: the benchmark refuses to run (the test below)")
    done, rows = run_benchmark(tmp_path, "triton_kernels.py", "--tokens", "32", "--vocab", "300", "--seq-len", "16",
                               "--heads", "2", "--head-dim", "8", "--ffn", "24", "--hidden", "20", "--repeats", "1",
                               "--warmup", "0")
    assert [(r["kernel"], r["impl"]) for r in rows] == [(k, i) for k in ("cross_entropy", "rotary", "swiglu", "permute")
                                                         for i in ("torch", "triton")]
    elements = {"cross_entropy": 3 * 32 * 300, "rotary": 4 * 2 * 16 * 2 * 8, "swiglu": 8 * 32 * 24, "permute": 9 * 32 * 20}
    for row in rows:
        assert row["tokens"] == 32 and row["ms"] > 0 and "error" not in row
        assert row["gb_per_s"] == pytest.approx(elements[row["kernel"]] * 4 / (row["ms"] / 1e3) / 1e9)
        torch_row = next(r for r in rows if r["kernel"] == row["kernel"] and r["impl"] == "torch")
        assert row["speedup_vs_torch"] == pytest.approx(torch_row["ms"] / row["ms"])
    assert "vs torch" in done.stdout


TINY = ["model.seq_len=32", "model.hidden_size=64", "model.num_heads=4", "model.ffn_hidden_size=128",
        "train.global_batch=8", "train.micro_batch=2"]


def test_every_end_to_end_suite_model_is_a_valid_config(monkeypatch):
    """A GPU call is rare and short: a suite row whose overrides do not load would only fail there."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from end_to_end import QUIET, SUITES

    from megatron_unipool.config import load_config

    for suite in SUITES.values():
        for name, (config, overrides) in suite.items():
            loaded = load_config(REPO / config, QUIET + overrides)
            assert loaded.model.compile == name.endswith("-compiled"), name


def test_end_to_end_row_follows_its_formulas(data_cache, monkeypatch):
    """Each field of a row from its closed form, under a fake clock (two steps in 0.5 s), a peak of 1 TFLOP/s and
    a peak RSS of 2 GiB: times per step (not per run), TFLOP/s from the budget's FLOPs per token, MFU in percent,
    memory in MiB, and the table's ratio to vanilla."""
    import resource
    import types

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import end_to_end

    from megatron_unipool.config import load_config
    from megatron_unipool.model import param_budget

    overrides = [*TINY, f"data.cache_dir={data_cache}"]
    ticks, peak = iter([10.0, 10.5]), 1e12
    monkeypatch.setattr(end_to_end, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks),
                                                                  strftime=time.strftime))
    monkeypatch.setattr(end_to_end, "peak_flops", lambda precision: peak)
    monkeypatch.setattr(end_to_end, "count_host_operators", lambda step: None)
    monkeypatch.setattr(resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=2048 * 1024))  # KiB
    row = end_to_end.measure("configs/tiny_vanilla_cpu.json", overrides, warmup=0, steps=2)
    config = load_config(REPO / "configs/tiny_vanilla_cpu.json", overrides)
    budget = param_budget(config.model, config.moe)
    assert row["step_ms"] == pytest.approx(250.0)
    assert row["tokens_per_second"] == pytest.approx(8 * 32 / 0.25)
    assert row["tflops"] == pytest.approx(8 * 32 / 0.25 * budget.train_flops_per_token / 1e12)
    assert row["mfu_percent"] == pytest.approx(100 * row["tflops"] * 1e12 / peak)
    assert (row["total_params"], row["active_params"]) == (budget.total_params, budget.active_params)
    assert row["peak_memory_mib"] == pytest.approx(2048.0)
    rows = [dict(row, name="vanilla"), dict(row, name="unipool", kind="unipool", step_ms=500.0)]
    assert end_to_end.table(rows).splitlines()[-1].split()[-1] == "2.000"


def test_end_to_end_benchmark_measures_each_model(data_cache, tmp_path):
    done, rows = run_benchmark(tmp_path, "end_to_end.py", "--models", "vanilla", "unipool", "dense", "--warmup", "1",
                               "--steps", "1", "--profile-steps", "1",
                               *config_overrides(*TINY, f"data.cache_dir={data_cache}"))
    assert [r["name"] for r in rows] == ["vanilla", "unipool", "dense"]
    for row in rows:
        assert row["tokens_per_step"] == 8 * 32 and row["tokens_per_second"] > 0 and row["peak_memory_mib"] > 0
        assert row["mfu_percent"] is None  # no peak FLOP/s on CPU: no invented MFU
        assert row["backend"] == "built-in"
        profile = row["profile"]  # CPU: operators' self time, which cannot exceed the wall time
        assert profile["steps"] == 1 and 0 < profile["busy_ms"] <= profile["wall_ms"]
        assert sum(profile["categories"].values()) == pytest.approx(profile["busy_ms"])
        assert "gemm" in profile["categories"] and profile["launches_per_step"] > 0
        top = [kernel["ms"] for kernel in profile["top"]]
        assert top == sorted(top, reverse=True) and top[0] <= profile["busy_ms"]
        assert sum(profile["kernels"].values()) == pytest.approx(profile["busy_ms"])
        assert row["host_operators_per_step"] == sum(row["host_operators"].values()) and "mm" in row["host_operators"]
    # the MoE layers' routing, dispatch and bookkeeping on top of the same attention
    assert rows[0]["host_operators_per_step"] > rows[2]["host_operators_per_step"]
    assert "vs vanilla" in done.stdout and "operators per step" in done.stderr
    busy = {row["name"]: sum(row["profile"]["kernels"].values()) for row in rows}
    assert f"unipool vs vanilla: device busy {busy['unipool'] - busy['vanilla']:+.1f} ms per profiled step" in done.stdout
    assert f"vanilla vs dense: device busy {busy['vanilla'] - busy['dense']:+.1f} ms per profiled step" in done.stdout
    assert "dense vs" not in done.stdout


def test_end_to_end_benchmark_keeps_the_timing_when_profiling_or_counting_fails(data_cache, monkeypatch):
    """The profile and the operator count run after the timed steps: a profiler that fails (its CUDA timeline),
    or a count that does, leaves the row's step time and throughput, with the error beside them."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import end_to_end

    def failing(error):
        def run(step, *args):
            step()
            raise error
        return run

    monkeypatch.setattr(end_to_end, "profile_steps", failing(AttributeError("no linked_correlation_id")))
    monkeypatch.setattr(end_to_end, "count_host_operators", failing(RuntimeError("no dispatch mode here")))
    row = end_to_end.measure("configs/tiny_dense_cpu.json", TINY + [f"data.cache_dir={data_cache}"], warmup=0,
                             steps=1, profiled=1)
    assert row["step_ms"] > 0 and row["tokens_per_second"] > 0 and "profile" not in row
    assert row["profile_error"] == "AttributeError: no linked_correlation_id"
    assert row["host_operators_per_step"] is None and row["host_operators_error"] == "RuntimeError: no dispatch mode here"


def test_host_operators_are_counted_below_autograd_forward_and_backward(monkeypatch):
    """Each aten operator a step dispatches counts once, those of autograd's backward too: a function of known
    operators, then its backward (mul's gradient is a mul)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from step_profile import count_host_operators

    x = torch.ones(4, requires_grad=True)
    with torch.no_grad():
        assert count_host_operators(lambda: torch.mul(x, 2).add_(1).sum()) == {"mul": 1, "add_": 1, "sum": 1}
    forward_and_backward = count_host_operators(lambda: torch.mul(x, x).sum().backward())
    assert forward_and_backward["mul"] >= 2 and forward_and_backward["sum"] == 1


def test_end_to_end_benchmark_counts_no_host_operators_for_compiled_blocks(data_cache, monkeypatch):
    """torch.compile's graphs run eager while a dispatch mode is active: the count would be of the eager blocks."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import end_to_end

    row = end_to_end.measure("configs/tiny_dense_cpu.json", TINY + [f"data.cache_dir={data_cache}", "model.compile=true"],
                             warmup=1, steps=1)
    assert row["step_ms"] > 0 and row["host_operators_per_step"] is None and row["host_operators"] is None


def test_end_to_end_benchmark_measures_through_deepspeed(data_cache, tmp_path):
    """--set deepspeed.enabled=true: the engine gets a process group of one (it asserts without one)."""
    _, [row] = run_benchmark(tmp_path, "end_to_end.py", "--models", "unipool", "--warmup", "1", "--steps", "1",
                             *config_overrides(*TINY, f"data.cache_dir={data_cache}", "deepspeed.enabled=true",
                                               "deepspeed.zero_stage=1"))
    assert row["backend"] == "deepspeed zero-1" and row["step_ms"] > 0 and "error" not in row


def test_step_profile_counts_each_kernel_once_by_category(monkeypatch):
    """On CUDA: device time per kernel category per step, without the user annotations that span
    kernels already counted (torch's optimizer step) or host-side operators."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from step_profile import categorise, difference, format_difference, format_profile, summarise

    def event(key, micros, count, device=DeviceType.CUDA, annotation=False):
        return SimpleNamespace(key=key, self_device_time_total=micros, self_cpu_time_total=micros, count=count,
                               device_type=device, is_user_annotation=annotation)

    averages = [event("nvjet_sm90_tst_192x128_64x5_1x2_h_bz_coopB_NNT", 6000, 40),
                event("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", 3000, 4),
                event("Optimizer.step#AdamW.step", 3000, 2, annotation=True),
                event("aten::mm", 9000, 40, device=DeviceType.CPU),
                event("void at::native::vectorized_elementwise_kernel<8, silu>", 1000, 20)]
    summary = summarise(averages, steps=2, wall_seconds=0.02, on_cuda=True, top=2)
    assert summary["categories"] == {"gemm": 3.0, "optimizer": 1.5, "elementwise": 0.5}
    assert summary["busy_ms"] == 5.0 and summary["wall_ms"] == 10.0 and summary["busy_percent"] == 50.0
    assert summary["launches_per_step"] == 32
    assert [kernel["category"] for kernel in summary["top"]] == ["gemm", "optimizer"]
    assert summary["kernels"] == {"nvjet_sm90_tst_192x128_64x5_1x2_h_bz_coopB_NNT": 3.0,
                                  "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>": 1.5,
                                  "void at::native::vectorized_elementwise_kernel<8, silu>": 0.5}
    assert list(summary["categories"]) == ["gemm", "optimizer", "elementwise"]  # largest first
    printed = format_profile("vanilla", summary).splitlines()
    assert printed[0] == "vanilla: 10.0 ms per profiled step, device busy 5.0 ms (50%), 32 kernels per step"
    assert printed[1].split() == ["gemm", "3.00", "ms", "60.0%"]  # a share of the busy time, not of the wall
    on_cpu = summarise([event("aten::mm", 4000, 8, device=DeviceType.CPU), event("aten::add", 0, 5, device=DeviceType.CPU),
                        event("ProfilerStep#1", 9000, 1, device=DeviceType.CPU)], steps=1, wall_seconds=0.01,
                       on_cuda=False, top=5)
    assert on_cpu["busy_ms"] == 4.0 and on_cpu["launches_per_step"] == 8  # operators that ran, not the ranges around them
    assert format_profile("dense", on_cpu).splitlines()[0].endswith("CPU operators busy 4.0 ms (40%), 8 operators per step")
    other = summarise([event("nvjet_sm90_tst_192x128_64x5_1x2_h_bz_coopB_NNT", 6000, 40),
                       event("void at::native::indexFuncLargeIndex<c10::BFloat16>", 4000, 20),
                       event("void at::native::vectorized_elementwise_kernel<8, silu>", 1600, 20)],
                      steps=2, wall_seconds=0.02, on_cuda=True, top=2)
    diff = difference(other, summary, top=2)
    assert diff["busy_ms"] == pytest.approx(0.8)  # 5.8 - 5.0
    assert diff["categories"] == {"sort / scan / index": 2.0, "optimizer": -1.5, "elementwise": pytest.approx(0.3),
                                  "gemm": 0.0}
    assert diff["kernels"] == {"void at::native::indexFuncLargeIndex<c10::BFloat16>": 2.0,
                               "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>": -1.5}
    printed = format_difference("unipool", "vanilla", diff).splitlines()
    assert printed[0] == "unipool vs vanilla: device busy +0.8 ms per profiled step"
    assert printed[1].split() == ["sort", "/", "scan", "/", "index", "+2.00", "ms"]
    assert "gemm" not in "".join(printed[1:4])  # unchanged categories are left out
    assert printed[-1].split()[:4] == ["-1.50", "ms", "[optimizer]", "void"]
    assert [categorise(name) for name in ("aten::_grouped_mm", "cudnn_generated_fort_native_sdpa_sm90_flash_bprop",
                                          "void at::native::indexFuncLargeIndex<float>", "aten::addmm",
                                          "_cross_entropy_backward_kernel")] == [
        "grouped gemm", "attention", "sort / scan / index", "gemm", "cross entropy / softmax"]
    # aten::topk is no copy ("aten::to" matched it), and every Triton kernel of ours has its category
    assert categorise("aten::topk") == "sort / scan / index"
    ours = {"_segmented_at_b_kernel": "grouped gemm", "_rows_grouped_mm_kernel": "grouped gemm",
            "_gather_rows_kernel": "sort / scan / index", "_sum_rows_kernel": "sort / scan / index",
            "_combine_backward_kernel": "sort / scan / index", "_rotary_kernel": "elementwise",
            "_swiglu_forward_kernel": "elementwise", "_swiglu_backward_kernel": "elementwise",
            "_cross_entropy_forward_kernel": "cross entropy / softmax"}
    assert {name: categorise(name) for name in ours} == ours


def test_step_profile_charges_each_idle_gap_to_the_launch_that_ends_it(monkeypatch):
    """The device's idle time between kernels, by gap size and by the host operator whose launch ended
    the gap; the host's waits for the device by operator; both linked through kineto's correlation ids."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from step_profile import DeviceSpan, device_timeline, format_profile, host_waits, idle_gaps, summarise

    spans = [DeviceSpan(25, 30, "aten::mul"), DeviceSpan(0, 10, "aten::mm"), DeviceSpan(5, 8, "aten::copy_"),
             DeviceSpan(10, 20, "aten::add"), DeviceSpan(80, 90, "aten::mul"),
             DeviceSpan(1090, 1100, "IndexSelectBackward0 > aten::index_add_"), DeviceSpan(1100.5, 1200, "aten::mm")]
    idle = idle_gaps(spans, steps=1)  # gaps: 5 us (mul), 50 us (mul), 1000 us (index_add_), 0.5 us (mm)
    assert idle["idle_ms"] == pytest.approx(1.0555) and idle["gaps_per_step"] == 4
    assert idle["by_size_ms"] == pytest.approx({"< 10 us": 0.0055, "10-100 us": 0.05, "0.1-1 ms": 0.0, ">= 1 ms": 1.0})
    assert [(row["launched_by"], row["gaps"]) for row in idle["causes"]] == [
        ("IndexSelectBackward0 > aten::index_add_", 1), ("aten::mul", 2), ("aten::mm", 1)]
    assert [row["ms"] for row in idle["causes"]] == pytest.approx([1.0, 0.055, 0.0005])
    assert idle_gaps([DeviceSpan(0, 10, "a"), DeviceSpan(2, 30, "b"), DeviceSpan(20, 25, "c")], steps=1)["idle_ms"] == 0

    waits = host_waits([(300.0, "aten::item > aten::_local_scalar_dense (cudaStreamSynchronize)"),
                        (50.0, "(outside any operator) (cudaDeviceSynchronize)"),
                        (100.0, "aten::item > aten::_local_scalar_dense (cudaStreamSynchronize)")], steps=2)
    assert waits["ms"] == pytest.approx(0.225) and waits["per_step"] == 1.5
    assert waits["operators"][0] == {"operator": "aten::item > aten::_local_scalar_dense (cudaStreamSynchronize)",
                                     "ms": pytest.approx(0.2), "calls": 1.0}

    # a profile as torch gives it: host operators (FunctionEvents, nested) and kineto's events, where kernels and
    # runtime calls name their operator by its correlation id; a runtime call's own id may equal an operator's
    item = SimpleNamespace(id=7, name="aten::item", device_type=DeviceType.CPU, cpu_parent=None)
    scalar = SimpleNamespace(id=8, name="aten::_local_scalar_dense", device_type=DeviceType.CPU, cpu_parent=item)
    mul = SimpleNamespace(id=9, name="aten::mul", device_type=DeviceType.CPU, cpu_parent=None)
    launch = SimpleNamespace(id=8, name="cudaLaunchKernel", device_type=DeviceType.CPU, cpu_parent=mul)

    def kineto(name, device, start_us, end_us, linked, annotation=False):
        return SimpleNamespace(name=lambda: name, device_type=lambda: device, start_ns=lambda: start_us * 1000,
                               end_ns=lambda: end_us * 1000, duration_ns=lambda: (end_us - start_us) * 1000,
                               linked_correlation_id=lambda: linked, is_user_annotation=lambda: annotation)

    prof = SimpleNamespace(events=lambda: [item, scalar, mul, launch], profiler=SimpleNamespace(
        kineto_results=SimpleNamespace(events=lambda: [
            kineto("aten::mul", DeviceType.CPU, 0, 5, 0),
            kineto("cudaLaunchKernel", DeviceType.CPU, 1, 2, 9),
            kineto("Optimizer.step#AdamW.step", DeviceType.CUDA, 0, 60, 0, annotation=True),  # spans, not work
            kineto("void at::native::vectorized_elementwise_kernel", DeviceType.CUDA, 3, 10, 9),
            kineto("cudaStreamSynchronize", DeviceType.CPU, 12, 40, 8),
            kineto("cudaDeviceSynchronize", DeviceType.CPU, 50, 51, 0),
            kineto("Memcpy DtoH (Device -> Pinned)", DeviceType.CUDA, 38, 39, 8)])))
    spans, waits = device_timeline(prof)
    assert spans == [DeviceSpan(3, 10, "aten::mul"), DeviceSpan(38, 39, "aten::item > aten::_local_scalar_dense")]
    assert waits == [(28.0, "aten::item > aten::_local_scalar_dense (cudaStreamSynchronize)"),
                     (1.0, "(outside any operator) (cudaDeviceSynchronize)")]

    summary = summarise([SimpleNamespace(key="gemm", self_device_time_total=2000, self_cpu_time_total=0, count=2,
                                         device_type=DeviceType.CUDA, is_user_annotation=False)],
                        steps=1, wall_seconds=0.004, on_cuda=True, top=2)
    summary["timeline"] = {"idle": idle, "host_waits": host_waits(waits, steps=1)}
    printed = format_profile("vanilla", summary).splitlines()
    assert printed[-7].startswith("  device idle between kernels 1.1 ms in 4 gaps (< 10 us 0.0 ms, 10-100 us 0.1 ms,")
    assert printed[-6].split() == ["1.00", "ms", "1", "gaps", "IndexSelectBackward0", ">", "aten::index_add_"]
    assert printed[-3] == "  host waited for the device 0.0 ms in 2 calls:"
    assert printed[-2].split() == ["0.03", "ms", "1", "calls", "aten::item", ">", "aten::_local_scalar_dense",
                                   "(cudaStreamSynchronize)"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device timeline needs CUDA kernels")
def test_step_profile_finds_a_host_stall_and_a_sync_on_cuda(monkeypatch):
    """A step that sleeps on the host before a kernel leaves the device idle, charged to that kernel's
    operator; its .item() is a host wait under aten::item."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from step_profile import profile_steps

    a = torch.randn(2048, 2048, device="cuda")

    def step():
        b = a @ a
        b.sum().item()
        time.sleep(0.02)
        b.mul(2)

    step()
    timeline = profile_steps(step, steps=2)["timeline"]
    slowest = timeline["idle"]["causes"][0]
    assert slowest["launched_by"] == "aten::mul" and slowest["ms"] >= 20 and slowest["gaps"] == 1
    assert any("aten::item" in row["operator"] and row["calls"] >= 1 for row in timeline["host_waits"]["operators"])


def test_end_to_end_benchmark_records_a_failed_model_and_measures_the_rest(data_cache, tmp_path):
    """top_k=100 is refused for the MoE model only: its row carries the error, dense is still measured,
    and the exit status says that something failed."""
    done, (failed, measured) = run_benchmark(
        tmp_path, "end_to_end.py", "--models", "vanilla", "dense", "--warmup", "0", "--steps", "1",
        *config_overrides(*TINY, f"data.cache_dir={data_cache}", "moe.top_k=100"), status=1)
    assert failed["name"] == "vanilla" and "exit status 1" in failed["error"] and "step_ms" not in failed
    assert measured["name"] == "dense" and measured["tokens_per_second"] > 0 and "error" not in measured
    assert "moe.top_k=100 exceeds" in done.stderr and "vanilla failed" in done.stdout


@pytest.mark.parametrize("precision, row_bytes", [("fp32", 4), ("bf16", 2)])
def test_comm_benchmark_counts_every_token_exchange(data_cache, tmp_path, precision, row_bytes):
    """Dropless: each routed slot's row crosses the all-to-all four times per step (dispatch and
    return, forward and backward); the bytes must add up to exactly that, for both models. Under bf16
    the rows travel in bf16 (the experts' dtype), not as the fp32 residual stream."""
    _, rows = run_benchmark(tmp_path, "comm.py", "--ep", "2", "--steps", "1", *config_overrides(
        *TINY, f"data.cache_dir={data_cache}", f"train.precision={precision}"), cwd=REPO)
    assert [r["kind"] for r in rows] == ["vanilla", "unipool"]
    for row in rows:
        slots = row["tokens_per_step"] * row["top_k"] * row["moe_layers"]
        assert row["routed_slots_per_step"] == slots
        assert row["token_bytes_remote_per_step"] + row["token_bytes_local_per_step"] == 4 * slots * 64 * row_bytes
        assert 0 < row["remote_fraction"] < 1
        # per rank: dispatch and return, forward and backward, in each MoE layer of each micro-batch
        micro_batches = 8 // (2 * row["world_size"])
        assert row["all_to_all_calls_per_step"] == 4 * row["moe_layers"] * micro_batches
        # each exchange's counts first: [ep, experts / ep] int64 from every rank, the other ranks' part remote
        experts = 8 * (row["moe_layers"] if row["kind"] == "unipool" else 1)
        exchanges = row["moe_layers"] * micro_batches * row["world_size"]
        assert row["count_bytes_remote_per_step"] == exchanges * (row["ep"] - 1) * (experts // row["ep"]) * 8


@pytest.mark.parametrize("step_set, checks, measuring", [
    ("main", ("kernels",), ("grouped_gemm", "pool_gemm", "moe_layer", "triton_kernels", "end_to_end_182m",
                            "end_to_end_469m")),
    ("followup", (), ("moe_layer", "end_to_end_182m", "end_to_end_469m")),
    ("tests", ("kernels",), ()),
    ("targets", ("kernels",), ("end_to_end_182m", "end_to_end_469m")),
])
def test_gpu_checks_script_runs_every_step_in_quick_mode(data_cache, tmp_path, step_set, checks, measuring):
    """The one-call GPU script's plumbing, at tiny sizes on CPU, for each of its step sets: every step
    ends 0 and writes its rows, and nothing else lands in OUT (a device lends back at most 8 files)."""
    from megatron_unipool.data import prepare_default_corpus

    if measuring:
        prepare_default_corpus("byte", data_cache)
    data_dir = data_cache if measuring else str(tmp_path / "no_corpus")  # the tests alone need none
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_checks.sh"), str(out)], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, QUICK="1", DATA_DIR=data_dir, SET=step_set))
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [line.split(":")[0] for line in done.stdout.splitlines() if line.startswith("== ") and ": exit " in line]
    assert steps == [f"== {step}" for step in ("environment", *checks, *measuring)], done.stdout[-3000:]
    for step in ("environment", *checks, *measuring):
        assert f"== {step}: exit 0" in done.stdout, done.stdout[-3000:]
    rows = {name: json.loads((out / f"{name}.json").read_text()) for name in measuring}
    assert all(rows.values())
    if step_set in ("main", "targets"):
        assert all("profile" in row for row in rows["end_to_end_182m"])
    elif step_set == "followup":  # the router eager and compiled beside the layer; a compiled model beside its baseline
        assert {row["impl"] for row in rows["moe_layer"]} == {"ours", "routing", "routing_fused", "routing_norm",
                                                              "routing_norm_fused"}
        assert [row["name"] for row in rows["end_to_end_182m"]] == ["vanilla", "unipool-compiled"]
        assert all("error" not in row for step_rows in rows.values() for row in step_rows)
    assert sorted(path.name for path in out.iterdir()) == sorted([f"{name}.json" for name in measuring] + ["steps.log"])


def test_gpu_checks_script_stops_before_any_work_without_its_corpus(tmp_path):
    """Without the tokenised corpus every end-to-end model would start and fail on its own, at minutes of a
    rare GPU call; a relative OUT or DATA_DIR is the caller's, not the repository's."""
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_checks.sh"), "out"], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env=dict(os.environ, QUICK="1", DATA_DIR="none"))
    assert done.returncode == 2 and f"no {tmp_path}/none/shakespeare_byte_train.bin" in done.stderr, done.stderr
    assert "== environment" not in done.stdout
    assert "stopping before any GPU work" in (tmp_path / "out" / "steps.log").read_text()


def test_ratios_compare_with_the_reference_row_of_the_same_expert_count(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from measurement import add_ratios

    rows = [{"impl": impl, "tokens": 64, "experts": experts, "top_k": 1, "tps": value}
            for impl, experts, value in [("deepspeed", 8, 100.0), ("deepspeed", 32, 50.0), ("ours", 8, 200.0),
                                         ("ours", 32, 200.0)]]
    add_ratios(rows, "deepspeed", "tokens", "tps", "vs")
    assert [row["vs"] for row in rows] == [1.0, 1.0, 2.0, 4.0]


def test_median_seconds_is_the_median_of_the_repeats(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import measurement

    clock = iter([0, 1, 10, 15, 20, 22])  # durations 1, 5, 2
    monkeypatch.setattr(measurement.time, "perf_counter", lambda: next(clock))
    assert measurement.median_seconds(lambda: None, repeats=3, warmup=0, device=torch.device("cpu")) == 2


def test_profile_top_kernels_are_per_step(monkeypatch):
    """A kernel of 40 calls and 6 ms over two profiled steps: 20 calls and 3 ms a step."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from step_profile import summarise

    event = SimpleNamespace(key="nvjet_gemm", self_device_time_total=6000, self_cpu_time_total=6000, count=40,
                            device_type=DeviceType.CUDA, is_user_annotation=False)
    summary = summarise([event], steps=2, wall_seconds=0.02, on_cuda=True, top=1)
    assert summary["top"] == [{"name": "nvjet_gemm", "ms": 3.0, "calls": 20.0, "category": "gemm"}]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the script measures on CUDA")
def test_gpu_checks_script_refuses_a_machine_without_cuda_unless_quick(tmp_path):
    """Without QUICK every step is minutes of full-size work on a CPU, measuring nothing the docs take."""
    environment = {name: value for name, value in os.environ.items() if name != "QUICK"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_checks.sh"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60, env=environment)
    assert done.returncode == 2 and "no CUDA device here" in done.stderr and "QUICK=1" in done.stderr, done.stderr
    assert done.stdout == "" and not (tmp_path / "out").exists()


def test_gpu_checks_script_refuses_an_unknown_step_set(tmp_path):
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_checks.sh"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ, SET="follow-up"))
    assert done.returncode == 2 and "SET must be main, followup, tests or targets, not 'follow-up'" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton runs on CUDA")
def test_triton_kernels_benchmark_measures_nothing_where_triton_cannot_run(tmp_path):
    """Without the interpreter a CPU has only the eager rows, and the default 32768 x 51200 fp32 logits
    were killed for memory on a 24 GiB machine after minutes of measuring."""
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "triton_kernels.py")], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, env=environment)
    assert done.returncode == 2 and "Triton cannot run here" in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script, arguments, message", [
    ("end_to_end.py", ["--set", "train.max_step=3"], "unknown key train.max_step"),
    ("comm.py", ["--set", "train.max_step=3"], "unknown key train.max_step"),
    ("comm.py", ["--ep", "3"], "must be divisible by parallel.ep=3"),
    ("comm.py", ["--ep", "1"], "--ep must be at least 2, not 1"),  # was a traceback after its start
    ("moe_layer.py", ["--repeats", "0"], "argument --repeats: must be at least 1, not 0"),  # each row failed
    ("end_to_end.py", ["--steps", "0"], "argument --steps: must be at least 1, not 0"),  # each model, after its build
    ("comm.py", ["--steps", "0"], "argument --steps: must be at least 1, not 0"),
    # a division by the count, after each model's build
    ("end_to_end.py", ["--profile-steps", "-1"], "argument --profile-steps: must be at least 0, not -1"),
    ("grouped_gemm.py", ["--warmup", "-1"], "argument --warmup: must be at least 0, not -1"),
    ("moe_layer.py", ["--json", "missing/rows.json"], "argument --json: directory missing does not exist"),
    ("grouped_gemm.py", ["--json", "missing/rows.json"], "argument --json: directory missing does not exist"),
    ("end_to_end.py", ["--json", "missing/rows.json"], "argument --json: directory missing does not exist"),
    # a directory was a traceback after the first measurement (comm.py: after the whole run)
    ("moe_layer.py", ["--json", "."], "argument --json: . is a directory"),
    ("comm.py", ["--json", "."], "argument --json: . is a directory"),
    # a --set only one of the two models takes was a traceback from every spawned rank
    ("comm.py", ["--set", "moe.pool_size=16"], "tiny_vanilla_cpu.json: inconsistent config"),
])
def test_benchmarks_check_their_arguments_before_measuring(tmp_path, script, arguments, message):
    """A typo was a traceback per model (or rank) after each had started; a missing --json directory
    lost the first measurement."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *arguments], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-1500:]
    assert "Traceback" not in done.stderr and "measuring" not in done.stderr


def test_a_failed_measurements_error_is_its_type_and_first_line_cut_short(monkeypatch):
    """A row's error is one bounded line: a 300-character message (a shape dump) is cut at 200."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import measurement

    assert measurement.error_text(RuntimeError("x" * 300 + "\nsecond line")) == "RuntimeError: " + "x" * 200
    assert measurement.error_text(AssertionError()) == "AssertionError: "


def test_grouped_gemm_benchmark_writes_a_rows_parts_before_the_next_measurement(tmp_path, monkeypatch):
    """A step cut at its time limit (gpu_checks' timeout) keeps the fwd/wgrad parts of the rows done so far:
    the JSON is rewritten after the parts, not only by the next row's measurement or at the end."""
    import json

    import pytest

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import grouped_gemm

    measure = grouped_gemm.measure

    def cut_after_dense(impl, *args):
        if impl != "dense":
            raise KeyboardInterrupt  # the run stopped as the next row starts
        return measure(impl, *args)

    monkeypatch.setattr(grouped_gemm, "measure", cut_after_dense)
    out = tmp_path / "rows.json"
    with pytest.raises(KeyboardInterrupt):
        grouped_gemm.main(["--rows", "64", "--experts", "4", "--hidden", "32", "--ffn", "16", "--repeats", "1",
                           "--warmup", "0", "--json", str(out)])
    [row] = json.loads(out.read_text())
    assert row["impl"] == "dense" and row["fwd_ms"] > 0 and row["wgrad_ms"] > 0


def test_tool_memory_benchmark_runs_each_tool_on_its_input(tmp_path, monkeypatch):
    """A row per tool run, sized by the input it was given: the long document's bytes, the checkpoint's weights."""
    from script_modules import load_script

    from megatron_unipool.config import load_config
    from megatron_unipool.model import LanguageModel

    overrides = ["moe.router=softmax"]
    done, rows = run_benchmark(tmp_path, "tool_memory.py", "--document-mb", "0.05", "--documents", "20", "--tokenizers",
                               "byte", "--config", "configs/tiny_vanilla_cpu.json", *config_overrides(*overrides),
                               cwd=REPO)
    assert [row["tool"] for row in rows] == ["preprocess byte x1", "preprocess byte x2", "convert --to hf", "upcycle x2"]
    assert not [row for row in rows if "error" in row], rows
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # where it finds `measurement`
    benchmark = load_script(REPO / "benchmarks" / "tool_memory.py")
    document = benchmark.write_corpus(tmp_path / "corpus.jsonl", 0.05, 20)
    config = load_config(REPO / "configs" / "tiny_vanilla_cpu.json", overrides, world_size=None)
    weights = sum(t.numel() * t.element_size() for t in LanguageModel(config.model, config.moe).state_dict().values())
    assert [row["input_mib"] * 2**20 for row in rows] == pytest.approx([document, document, weights, weights])
    assert rows[1]["worker_peak_mib"] > 0 and rows[0]["worker_peak_mib"] == 0  # only --workers 2 has workers
    for row in rows:
        assert row["above_start_per_input"] == pytest.approx(row["above_start_mib"] / row["input_mib"])
        assert row["peak_mib"] > 0 and row["seconds"] > 0
    assert "x input" in done.stdout and done.stdout.count("\n") == 5
