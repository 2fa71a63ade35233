"""fxq: a hardware-aware post-training quantization compiler on torch.fx.

    qm = fxq.compile(model, calib_data, target="shift-int")
    print(qm.ir)                 # the integer graph
    qm.run(x)                    # bit-exact numpy reference backend
    qm.export_onnx("m.onnx")     # QDQ model, same codes in ONNX Runtime
"""
from .api import QuantizedModel, compile, load
from .context import ReconstructOptions
from .errors import (CalibrationError, ExportError, FxqError, InputError, LoadError, PassError, TraceFailure,
                     UnsupportedOp, VerifyError)
from .formats import Rounding
from .targets import Target, TargetError, get_target, register_target, targets

__version__ = "0.1.0"
__all__ = ["compile", "load", "QuantizedModel", "Target", "targets", "register_target", "get_target",
           "Rounding", "ReconstructOptions", "FxqError", "TraceFailure", "UnsupportedOp", "CalibrationError", "VerifyError",
           "InputError", "LoadError", "ExportError", "PassError", "TargetError"]
