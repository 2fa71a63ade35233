"""fxq's graph passes, one per file, each ``(gm, ctx) -> gm`` run in PIPELINE order by fxq.pipeline."""
from .expand_attention import expand_attention
from .token_masks import token_masks
from .canonicalize import canonicalize
from .propagate_shapes import propagate_shapes
from .fold_bn import fold_bn
from .fold_pool_divisor import fold_pool_divisor
from .fold_constant_scale import fold_constant_scale
from .fit_clamp_range import fit_clamp_range
from .insert_observers import insert_observers
from .calibrate import calibrate
from .data_free_stats import data_free_stats
from .choose_formats import choose_formats
from .share_scales import share_scales
from .insert_fake_quant import insert_fake_quant
from .hessian_search import hessian_search
from .reconstruct import reconstruct
from .bias_correction import bias_correction
from .fit_shift_range import fit_shift_range

# Order for a CNN; calibrate and data_free_stats are alternatives (the runner picks one by ctx).
PIPELINE = (
    expand_attention,
    token_masks,
    canonicalize,
    propagate_shapes,
    fold_bn,
    fold_pool_divisor,
    fold_constant_scale,
    fit_clamp_range,
    insert_observers,
    calibrate,
    data_free_stats,
    choose_formats,
    share_scales,
    insert_fake_quant,
    hessian_search,
    reconstruct,
    bias_correction,
    fit_shift_range,
)

__all__ = [p.__name__ for p in PIPELINE] + ["PIPELINE"]
