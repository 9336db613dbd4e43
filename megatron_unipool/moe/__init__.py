"""Mixture-of-Experts building blocks: routers, balancing losses, dispatch, expert pools."""
from .balance import PoolStats
from .dispatch import DispatchPlan, permute, plan_dispatch, unpermute
from .experts import ExpertPool, SwiGLU
from .layer import MoELayer
from .losses import load_balancing_loss, pool_load_fraction, z_loss
from .router import Router, Routing, capacity, norm_router_constant
