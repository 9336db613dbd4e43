"""Forward + backward throughput of one MoE layer: ours vs DeepSpeed's MoE vs a per-expert loop vs
a dense SwiGLU of equal active FLOPs, over token and expert counts, measured in one run.

    python benchmarks/moe_layer.py [--tokens 2048 8192] [--experts 8 32] [--json results.json]

Prints a table (tokens/s and the ratio to DeepSpeed's layer) and writes one JSON row per
measurement: impl (ours | ours_grouped_mm | ours_loop | ours_triton | deepspeed | loop | dense | routing | routing_norm
| routing_fused | routing_norm_fused), tokens,
experts, top_k, hidden, ffn, dtype, tokens_per_second, ms, vs_deepspeed (null without DeepSpeed's row),
device (or `error` where a measurement failed, e.g. out of memory: the others still run). Weights stay fp32 and bf16 runs under autocast, as in training
(`--dtype auto`: bf16 on CUDA). `ours` uses the expert GEMM that model.expert_gemm='auto'
picks on this device (torch._grouped_mm on CUDA, the segment loop on CPU); by default the other one
is measured too, as `ours_loop` on CUDA or `ours_grouped_mm` on CPU; `ours_triton` is ours with the MoE
layer's Triton kernels (model.permute_kernel and model.swiglu_kernel), where Triton runs (CUDA, or a
CPU in its interpreter with TRITON_INTERPRET=1: slow). Routing is softmax top-k;
DeepSpeed's layer needs a capacity, so it gets `--capacity-factor` while ours and the loop are
dropless (DeepSpeed computes padded capacity slots, we compute only routed ones: part of what is
being compared), and its second expert is the deterministic second-best, as ours (not its default
Gumbel-sampled one); at top-1 it keeps the first tokens of each expert's capacity, as ours would (not
its default random selection, `use_rts`, extra work per token). `--top-k 1 2` measures both. `routing` times our layer's routing half alone (MoELayer.route: logits, softmax,
top-k, gates, the sort and counts of the dispatch plan, the aux loss), with its share of `ours` in
`share_of_ours`: at most what a fused router could save; `routing_norm` the same with UniPool's
routing (NormRouter, pool aux loss), its share taken of the same `ours` (the experts' work is the same).
`routing_fused` / `routing_norm_fused` (by name in --impls) are those with the router from its logits to the
gates compiled as model.compile runs it: the fused router; their first call per shape compiles (untimed warm-up).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
try:
    import megatron_unipool  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from megatron_unipool.config import MoEConfig  # noqa: E402
from megatron_unipool.moe import ExpertPool, MoELayer, PoolStats, SwiGLU  # noqa: E402
from megatron_unipool.kernels.triton_support import triton_runs_on  # noqa: E402
from megatron_unipool.parallel import init_distributed_from_env  # noqa: E402
from megatron_unipool.training.hardware import device_name  # noqa: E402
from measurement import (add_measurement_arguments, add_ratios, compute_dtype, measure_row, print_table,  # noqa: E402
                         time_forward_backward)

INIT_STD = 0.02


# the routing of ours (vanilla MoE's), and UniPool's: NormRouter with the pool aux loss
ROUTERS = {"softmax": dict(router="softmax", aux_loss="layer"), "norm": dict(router="norm", aux_loss="pool")}


def build_ours(hidden, ffn, experts, top_k, gemm="auto", router="softmax", kernels="torch", compile_router=False):
    """Our layer; `kernels` 'triton': its permute and combine and the experts' SwiGLU activation in Triton;
    `compile_router`: its router from the logits to the gates as one torch.compile graph (model.compile)."""
    config = MoEConfig(kind="vanilla", num_experts=experts, top_k=top_k, **ROUTERS[router])
    pool = ExpertPool(experts, hidden, ffn, INIT_STD, INIT_STD, gemm, activation=kernels)
    stats = PoolStats(1, experts, "step")
    layer = MoELayer(config, hidden, pool, stats, 0, 1, INIT_STD, INIT_STD, permute_kernel=kernels,
                     compile_router=compile_router)
    # the pool and the stats are not submodules of the layer: hold them all so that .to(device) moves them
    return torch.nn.ModuleList([layer, pool, stats]), lambda x: layer(x)[0], list(layer.parameters()) + list(pool.parameters())


def build_routing(hidden, ffn, experts, top_k, router="softmax", compiled=False):
    """Our layer's MoELayer.route alone, its outputs (gates, losses) reduced so that backward reaches every
    routing parameter as in the layer; `compiled`: with the router compiled (the fused router)."""
    if compiled:  # a graph of these shapes, static as model.compile's: not the dynamic one a recompile would make
        torch._dynamo.reset()
    # route() reads the pool's size, never its weights: a narrow pool saves building 96 x 7M parameters per row
    module, _, _ = build_ours(hidden, 16, experts, top_k, router=router, compile_router=compiled)
    layer = module[0]

    def forward(x):
        routing, _, losses = layer.route(x.reshape(-1, hidden))
        return routing.gates_TK.sum() + sum(losses.values())

    return module, forward, list(layer.router.parameters())


def build_loop(hidden, ffn, experts, top_k):
    """The textbook per-expert loop: gather each expert's tokens by mask, run it, scatter-add."""
    router = torch.nn.Linear(hidden, experts, bias=False)
    mlps = torch.nn.ModuleList(SwiGLU(hidden, ffn, INIT_STD, INIT_STD) for _ in range(experts))

    def forward(x):
        x = x.reshape(-1, hidden)
        gates, indices = F.softmax(router(x), dim=-1).topk(top_k, dim=-1)
        out = torch.zeros_like(x)
        for e, mlp in enumerate(mlps):
            token, slot = (indices == e).nonzero(as_tuple=True)
            if token.numel():
                out = out.index_add(0, token, (mlp(x[token]) * gates[token, slot].unsqueeze(-1)).to(out.dtype))
        return out

    return torch.nn.ModuleList([router, mlps]), forward, list(router.parameters()) + list(mlps.parameters())


def build_deepspeed(hidden, ffn, experts, top_k, capacity_factor):
    from deepspeed.moe.layer import MoE

    layer = MoE(hidden_size=hidden, expert=SwiGLU(hidden, ffn, INIT_STD, INIT_STD), num_experts=experts, ep_size=1,
                k=top_k, capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor, min_capacity=4,
                drop_tokens=True, top2_2nd_expert_sampling=False, use_rts=False)
    layer.set_deepspeed_parallelism()
    return layer, lambda x: layer(x)[0], list(layer.parameters())


def build_dense(hidden, ffn, experts, top_k):
    mlp = SwiGLU(hidden, top_k * ffn, INIT_STD, INIT_STD)  # the FLOPs of k experts per token
    return mlp, mlp, list(mlp.parameters())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--top-k", type=int, nargs="+", default=[2], choices=[1, 2],
                        help="DeepSpeed's layer supports 1 and 2 (the 182M and 469M models route top-1)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512, help="expert width")
    parser.add_argument("--capacity-factor", type=float, default=1.25, help="for DeepSpeed's layer")
    parser.add_argument("--impls", nargs="+", choices=["ours", "ours_grouped_mm", "ours_loop", "ours_triton",
                                                       "deepspeed", "loop", "dense", "routing", "routing_norm",
                                                       "routing_fused", "routing_norm_fused"],
                        help="default: ours, the expert GEMM ours does not pick here, ours_triton where Triton runs,"
                             " deepspeed, loop, dense, routing, routing_norm (the _fused ones compile first: asked"
                             " for by name)")
    add_measurement_arguments(parser)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.impls is None:
        other = "ours_loop" if device.type == "cuda" else "ours_grouped_mm"  # the GEMM 'auto' does not take here
        triton = ["ours_triton"] if triton_runs_on(device) else []
        args.impls = ["ours", other, *triton, "deepspeed", "loop", "dense", "routing", "routing_norm"]
    device_label = device_name()
    dtype = compute_dtype(args.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    autocast_to = None if dtype == torch.float32 else dtype  # bf16: fp32 weights under autocast, as in training
    if "deepspeed" in args.impls:
        init_distributed_from_env(600, even_alone=True)  # DeepSpeed's layer asks for its process groups
    builders = {"ours": build_ours, "ours_grouped_mm": lambda *a: build_ours(*a, gemm="grouped_mm"),
                "ours_loop": lambda *a: build_ours(*a, gemm="loop"), "ours_triton": lambda *a: build_ours(*a, kernels="triton"),
                "loop": build_loop, "dense": build_dense,
                "routing": build_routing, "routing_norm": lambda *a: build_routing(*a, router="norm"),
                "routing_fused": lambda *a: build_routing(*a, compiled=True),
                "routing_norm_fused": lambda *a: build_routing(*a, router="norm", compiled=True),
                "deepspeed": lambda *a: build_deepspeed(*a, args.capacity_factor)}
    rows = []
    for top_k, experts, tokens, impl in itertools.product(args.top_k, args.experts, args.tokens, args.impls):
        row = {"impl": impl, "tokens": tokens, "experts": experts, "top_k": top_k,
               "hidden": args.hidden, "ffn": args.ffn, "dtype": dtype_name, "device": device_label}
        if impl == "deepspeed":  # its rows (and every vs_deepspeed ratio) depend on it
            row["capacity_factor"] = args.capacity_factor
        torch.manual_seed(0)

        def measure(impl=impl, tokens=tokens, experts=experts, top_k=top_k):
            with device:  # initialised where it runs: a 96-expert pool built on the host took 3-6 s per row
                module, forward, params = builders[impl](args.hidden, args.ffn, experts, top_k)
            module.to(device)
            x = torch.randn(1, tokens, args.hidden, device=device, requires_grad=True)
            return time_forward_backward(forward, params, x, args.repeats, args.warmup, autocast_to)

        measure_row(rows, row, f"{impl:18s} top-{top_k} tokens {tokens:6d} experts {experts:3d}", measure,
                    lambda seconds, tokens=tokens: {"tokens_per_second": tokens / seconds, "ms": 1e3 * seconds},
                    args.json)
    print(f"MoE layer forward+backward on {device_label}: d={args.hidden}, expert width {args.ffn}, "
          f"top-k {' and '.join(map(str, args.top_k))}, {dtype_name}"
          + (f"; DeepSpeed's layer at capacity factor {args.capacity_factor}, its second expert deterministic"
             if "deepspeed" in args.impls else ""))
    routing = [row for row in rows if row["impl"].startswith("routing")]  # a part of a layer, not a layer:
    add_ratios([row for row in rows if not row["impl"].startswith("routing")], "deepspeed", "tokens",
               "tokens_per_second", "vs_deepspeed")
    add_ratios(routing, "ours", "tokens", "ms", "share_of_ours", references=rows)  # its share of our whole layer
    for row in routing:
        row.setdefault("vs_deepspeed", None)
    print_table(rows, [("top-k", "top_k", 5, ""), ("experts", "experts", 7, ""), ("tokens", "tokens", 7, ""),
                       ("impl", "impl", 18, ""),
                       ("tokens/s", "tokens_per_second", 12, "{:,.0f}"), ("ms", "ms", 9, "{:.2f}"),
                       ("vs deepspeed", "vs_deepspeed", 13, "{:.2f}x"), ("share of ours", "share_of_ours", 14, "{:.1%}")],
                naming=4)
    if args.json:  # again, with the ratios
        args.json.write_text(json.dumps(rows, indent=2))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
