"""The machinery the calibration passes share (hessian_search, reconstruct, reconstruct_gptq,
bias_correction, fit_shift_range): running the fake-quant graph node by node, changing a format in
place, cutting blocks and crops, the relaxed (learnable) quantizers, optimal-brain rounding."""
