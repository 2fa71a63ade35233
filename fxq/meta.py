"""Node-metadata keys, each with the pass that writes it. Passes read and write only these."""

KIND = "fxq.kind"              # canonicalize: one of fxq.meta.KINDS
SHAPE = "fxq.shape"            # propagate_shapes: output shape (batch dim included) of the example
SOURCE = "fxq.source"          # trace: "file:line  code" of the user's source, for error messages
BN_STATS = "fxq.bn_stats"      # fold_bn: BNStats of the BN folded into this conv/linear
POOL_GAIN = "fxq.pool_gain"    # fold_pool_divisor: factor folded into this conv/linear's weights
ROLE = "fxq.role"              # insert_observers: "qpoint" | "acc" | "pass" | "input" | "output" | "ids" | "mask"
FUSED_ACT = "fxq.fused_act"    # insert_observers: on an "acc" node, the activation node it feeds
OBSERVER = "fxq.observer"      # insert_observers: submodule name of this qpoint's observer
ACT_FMT = "fxq.act_fmt"        # choose_formats / share_scales: ActFormat of a qpoint's output
W_FMT = "fxq.w_fmt"            # choose_formats: WeightFormat of a conv/linear
SHARED_WITH = "fxq.shared_with"  # share_scales: name of the master qpoint whose format this one takes
DATA_FREE = "fxq.data_free"    # data_free_stats: per-channel (mean, std) used instead of data

KINDS = ("input", "output", "conv", "linear", "bn", "relu", "clamp", "add", "cat",
         "flatten", "reshape", "maxpool", "avgpool", "pad",
         "matmul", "permute", "select", "softmax", "gelu", "layer_norm", "mul_const", "const", "expand_batch",
         "embedding", "token_mask", "masked_mean", "l2_normalize")
# Families, so passes test membership rather than listing spellings.
WEIGHTED = frozenset({"conv", "linear"})
ACTIVATIONS = frozenset({"relu", "clamp"})
# Ops whose output codes are a rearrangement or selection of their input codes at the same format.
PASS_THROUGH = frozenset({"flatten", "reshape", "maxpool", "pad", "cat", "relu", "clamp", "permute", "select",
                          "expand_batch"})
# Nonlinearities a target may compute as float islands (fxq.islands); each output is a qpoint.
ISLANDS = frozenset({"softmax", "gelu", "layer_norm", "masked_mean", "l2_normalize"})
# Ops whose two data inputs are both activations.
BINARY = frozenset({"add", "matmul"})
# Producers of an int32 accumulator (or aligned sum) that a following ReLU/clamp fuses into.
ACC_PRODUCERS = WEIGHTED | BINARY
# Sign without running the model (fxq.walk.is_nonnegative): outputs >= 0 by definition; outputs that
# are >= 0 when the first input is; outputs that are >= 0 when every data input is.
NONNEGATIVE = frozenset({"relu", "softmax"})
SIGN_OF_INPUT = frozenset({"flatten", "reshape", "maxpool", "pad", "avgpool", "permute", "select", "expand_batch"})
SIGN_OF_ALL_INPUTS = frozenset({"cat", "add"})
