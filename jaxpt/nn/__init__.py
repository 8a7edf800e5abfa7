"""Functional layers: parameter pytrees (Equinox modules) plus pure functions.

Shape alphabet used in comments and einsum strings across jaxpt:

    B batch            T query positions     S key/value positions
    D model width      H query heads         K key/value heads     G = H // K
    Dh head width      F mlp hidden          V vocabulary          L layers
    E experts          C expert capacity

Every ``init_*`` takes a key first and returns params; every apply function takes the params
first, then its inputs, then the layer's spec (``AttentionSpec``, ``MoESpec``) where it has
one, options as keywords. Layers take what they use, never a whole model config. Nothing holds
state: jit, grad, vmap and eval_shape apply directly.
"""

from jaxpt.nn._attention import IMPLEMENTATIONS as IMPLEMENTATIONS
from jaxpt.nn._attention import Attention as Attention
from jaxpt.nn._attention import AttentionSpec as AttentionSpec
from jaxpt.nn._attention import KVCache as KVCache
from jaxpt.nn._attention import attend as attend
from jaxpt.nn._attention import attention as attention
from jaxpt.nn._attention import cached_attention as cached_attention
from jaxpt.nn._attention import causal_mask as causal_mask
from jaxpt.nn._attention import einsum_attention as einsum_attention
from jaxpt.nn._attention import init_attention as init_attention
from jaxpt.nn._attention import init_kv_cache as init_kv_cache
from jaxpt.nn._axes import Axes as Axes
from jaxpt.nn._axes import HasAxes as HasAxes
from jaxpt.nn._axes import constrain as constrain
from jaxpt.nn._axes import logical_axes as logical_axes
from jaxpt.nn._axes import map_params as map_params
from jaxpt.nn._axes import shard_activations as shard_activations
from jaxpt.nn._dropout import dropout as dropout
from jaxpt.nn._linear import Embedding as Embedding
from jaxpt.nn._linear import Linear as Linear
from jaxpt.nn._linear import ReadOut as ReadOut
from jaxpt.nn._linear import embed as embed
from jaxpt.nn._linear import init_embedding as init_embedding
from jaxpt.nn._linear import init_linear as init_linear
from jaxpt.nn._linear import init_read_out as init_read_out
from jaxpt.nn._linear import linear as linear
from jaxpt.nn._linear import read_out as read_out
from jaxpt.nn._linear import unembed as unembed
from jaxpt.nn._linear import weight_gradients_first as weight_gradients_first
from jaxpt.nn._loss import cross_entropy as cross_entropy
from jaxpt.nn._loss import token_nll as token_nll
from jaxpt.nn._mlp import ACTIVATIONS as ACTIVATIONS
from jaxpt.nn._mlp import GLU as GLU
from jaxpt.nn._mlp import MLP as MLP
from jaxpt.nn._mlp import activate as activate
from jaxpt.nn._mlp import glu as glu
from jaxpt.nn._mlp import init_glu as init_glu
from jaxpt.nn._mlp import init_mlp as init_mlp
from jaxpt.nn._mlp import mlp as mlp
from jaxpt.nn._moe import GROUPED_MATMULS as GROUPED_MATMULS
from jaxpt.nn._moe import ExpertLinear as ExpertLinear
from jaxpt.nn._moe import ExpertRows as ExpertRows
from jaxpt.nn._moe import Experts as Experts
from jaxpt.nn._moe import MoE as MoE
from jaxpt.nn._moe import MoESpec as MoESpec
from jaxpt.nn._moe import Routing as Routing
from jaxpt.nn._moe import SoftMoE as SoftMoE
from jaxpt.nn._moe import check_grouped_matmul as check_grouped_matmul
from jaxpt.nn._moe import combine_rows as combine_rows
from jaxpt.nn._moe import expert_capacity as expert_capacity
from jaxpt.nn._moe import expert_linear as expert_linear
from jaxpt.nn._moe import expert_parallel_axes as expert_parallel_axes
from jaxpt.nn._moe import expert_rows as expert_rows
from jaxpt.nn._moe import experts as experts
from jaxpt.nn._moe import gather_rows as gather_rows
from jaxpt.nn._moe import grouped_experts as grouped_experts
from jaxpt.nn._moe import init_expert_linear as init_expert_linear
from jaxpt.nn._moe import init_experts as init_experts
from jaxpt.nn._moe import init_moe as init_moe
from jaxpt.nn._moe import init_soft_moe as init_soft_moe
from jaxpt.nn._moe import moe as moe
from jaxpt.nn._moe import noisy_router_logits as noisy_router_logits
from jaxpt.nn._moe import ragged_expert_linear as ragged_expert_linear
from jaxpt.nn._moe import route as route
from jaxpt.nn._moe import router_losses as router_losses
from jaxpt.nn._moe import sequence_capacity as sequence_capacity
from jaxpt.nn._moe import soft_moe as soft_moe
from jaxpt.nn._moe import soft_moe_weights as soft_moe_weights
from jaxpt.nn._norm import NORMS as NORMS
from jaxpt.nn._norm import LayerNorm as LayerNorm
from jaxpt.nn._norm import Norm as Norm
from jaxpt.nn._norm import RMSNorm as RMSNorm
from jaxpt.nn._norm import layer_norm as layer_norm
from jaxpt.nn._norm import rms_norm as rms_norm
from jaxpt.nn._pallas import KERNELS as KERNELS
from jaxpt.nn._pallas import MIN_ROWS as MIN_ROWS
from jaxpt.nn._pallas import use_kernel as use_kernel
from jaxpt.nn._rope import apply_rope as apply_rope
from jaxpt.nn._rope import rope_angles as rope_angles
from jaxpt.nn._scan import REMAT_POLICIES as REMAT_POLICIES
from jaxpt.nn._scan import SplitLayers as SplitLayers
from jaxpt.nn._scan import remat as remat
from jaxpt.nn._scan import scan_layers as scan_layers
from jaxpt.nn._scan import split_layers as split_layers
from jaxpt.nn._scan import stack_layers as stack_layers
from jaxpt.nn._scan import unstack as unstack
