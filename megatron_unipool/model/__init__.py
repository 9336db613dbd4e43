"""The decoder language model (dense LLaMA, vanilla MoE, UniPool) and its size/FLOP accounting."""
from ..moe import ExpertPool, MoELayer  # the parts of the model the training tools reach into
from ..moe.router import Routing, norm_constant
from .accounting import ParamBudget, param_budget
from .loss import lm_loss_sum
from .transformer import Block, LanguageModel, RoutingStepStats
