"""fxq's graph passes, one per file, each ``(gm, ctx) -> gm``; PIPELINE is their order and what each declares.

fxq.pipeline.run_passes runs an entry only when its ``when`` holds, and with ``FXQ_CHECK_PASSES=1``
holds each pass to its ``requires``/``writes``. ``fxq passes`` prints this table.
"""
from fxq import meta
from fxq.pipeline import PassSpec, Pipeline

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
from .reconstruct_gptq import reconstruct_gptq
from .reconstruct import reconstruct
from .bias_correction import bias_correction
from .fit_shift_range import fit_shift_range


# When an optional pass runs: each predicate's docstring is the condition as `fxq passes` prints it.
def token_ids(ctx) -> bool:
    """the model input is token ids (an integer tensor)"""
    return not ctx.example_input.is_floating_point()


def fits_clamps(ctx) -> bool:
    """the target sets fit_clamps and its scales are not dyadic"""
    return ctx.target.fit_clamps and ctx.target.scale_kind != "dyadic"


def with_data(ctx) -> bool:
    """calibration data given"""
    return ctx.calib_batches is not None


def data_free(ctx) -> bool:
    """no calibration data"""
    return ctx.calib_batches is None


def searching(ctx) -> bool:
    """search is set, with calibration data"""
    return ctx.search is not None and with_data(ctx)


def reconstruct_gptq_mode(ctx) -> bool:
    """reconstruct mode 'gptq', with calibration data"""
    return ctx.reconstruct is not None and ctx.reconstruct.mode == "gptq" and with_data(ctx)


def reconstruct_learned(ctx) -> bool:
    """reconstruct mode 'rapq' or 'adaround', with calibration data"""
    return ctx.reconstruct is not None and ctx.reconstruct.mode != "gptq" and with_data(ctx)


def correcting_bias(ctx) -> bool:
    """bias_correction is set, with calibration data"""
    return ctx.bias_correction is not None and with_data(ctx)


def shift_requant(ctx) -> bool:
    """the target's scales are not dyadic (its requant is a shift)"""
    return ctx.target.scale_kind != "dyadic"


# Order for a CNN; calibrate and data_free_stats are alternatives, and so are reconstruct_gptq and reconstruct.
PIPELINE = Pipeline((
    PassSpec(expand_attention),
    PassSpec(token_masks, when=token_ids, writes=(meta.KIND,)),
    PassSpec(canonicalize, writes=(meta.KIND,)),
    PassSpec(propagate_shapes, requires=("canonicalize",), writes=(meta.SHAPE,)),
    PassSpec(fold_bn, requires=(meta.KIND,), writes=(meta.BN_STATS,)),
    PassSpec(fold_pool_divisor, requires=(meta.KIND, meta.SHAPE), may_write=(meta.POOL_GAIN,)),
    PassSpec(fold_constant_scale, requires=(meta.KIND,)),
    PassSpec(fit_clamp_range, when=fits_clamps, requires=("fold_bn", "fold_pool_divisor"),
             may_write=(meta.BN_STATS,)),
    PassSpec(insert_observers, requires=(meta.KIND,), writes=(meta.ROLE, meta.OBSERVER), may_write=(meta.FUSED_ACT,)),
    PassSpec(calibrate, when=with_data, requires=(meta.OBSERVER,)),
    PassSpec(data_free_stats, when=data_free, requires=(meta.OBSERVER, meta.SHAPE), writes=(meta.DATA_FREE,)),
    PassSpec(choose_formats, requires=(meta.OBSERVER, meta.ROLE), writes=(meta.ACT_FMT,), may_write=(meta.W_FMT,)),
    PassSpec(share_scales, requires=(meta.ACT_FMT,), writes=(meta.SHARED_WITH,), may_write=(meta.ACT_FMT,)),
    PassSpec(insert_fake_quant, requires=("choose_formats", "share_scales"),
             writes=(meta.KIND, meta.ROLE, meta.ACT_FMT)),
    PassSpec(hessian_search, when=searching, requires=("insert_fake_quant",), may_write=(meta.ACT_FMT, meta.W_FMT)),
    PassSpec(reconstruct_gptq, when=reconstruct_gptq_mode, requires=("insert_fake_quant",), may_write=(meta.W_FMT,)),
    PassSpec(reconstruct, when=reconstruct_learned, requires=("insert_fake_quant",),
             may_write=(meta.ACT_FMT, meta.W_FMT)),
    PassSpec(bias_correction, when=correcting_bias, requires=("insert_fake_quant",)),
    PassSpec(fit_shift_range, when=shift_requant, requires=("insert_fake_quant",), may_write=(meta.W_FMT,)),
))

__all__ = [s.name for s in PIPELINE] + ["PIPELINE"]
