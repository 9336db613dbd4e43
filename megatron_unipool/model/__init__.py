"""The decoder language model (dense LLaMA, vanilla MoE, UniPool) and its size/FLOP accounting."""
from .accounting import ParamBudget, param_budget
from .transformer import Block, LanguageModel, RoutingStepStats
