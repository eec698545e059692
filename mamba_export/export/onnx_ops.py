"""The custom-op domain on the ONNX side: op schemas, the exporter's translation table, and model-local functions.

* :func:`register_schemas` registers an ``onnx.defs.OpSchema`` per op so that the exporter and ``onnx.checker``
  know the domain.
* :func:`translation_table` maps each ``torch.library`` op of :mod:`.torch_ops` to one node of the domain.
* :func:`model_functions` builds each op as a ``FunctionProto`` of standard ops (a ``Scan`` for the recurrence), to be
  attached to a model after export: where the custom-op library is registered onnxruntime runs the library's
  kernel, elsewhere it inlines the function, so a stock onnxruntime runs the same file.

Layouts and semantics: docs/CONTRACTS.md. Symbols: b batch, l new tokens, e d_inner, n d_state, k d_conv, r dt_rank.
"""

from __future__ import annotations

import onnx
import onnx.defs
import onnxscript
from onnx import AttributeProto, TensorProto, helper

from . import torch_ops

DOMAIN = "ai.mamba_export"
DOMAIN_VERSION = 1
OPSET = 18  # the standard opset of every exported graph and of the functions
OP_NAMES = ("SelectiveScan", "CausalConv1d", "DecodeStep", "RMSNorm", "AddRMSNorm", "LinearF16W", "LinearI8W",
            "DecodeBlock", "DecodeHead")
DEFAULT_EPSILON = 1e-5  # RMSNorm's and AddRMSNorm's epsilon when a node does not set it

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_TYPES = {
    "T": ("T", _FLOATS, "activations (and, for the norms, the weight)"),
    "F": ("F", ["tensor(float)"], "parameters and states (LinearF16W, LinearI8W: activations and scales)"),
    "H": ("H", ["tensor(float16)"], "weights stored as float16"),
    "I": ("I", ["tensor(int8)"], "weights stored as int8"),
    "R": ("R", _FLOATS, "the residual stream: float32, or the same type as T"),
}
_FLAG = "0 or 1"
_P = onnx.defs.OpSchema.FormalParameter
# name -> (inputs, outputs, attributes {name: (default, description)}); each input/output is (name, type name).
_SIGNATURES = {
    "SelectiveScan": (
        [("u", "T"), ("delta", "T"), ("A", "F"), ("B", "T"), ("C", "T"), ("D", "F"), ("z", "T"),
         ("delta_bias", "F"), ("ssm_state_in", "F")],
        [("y", "T"), ("ssm_state_out", "F")],
        {"delta_softplus": (1, _FLAG)},
    ),
    "CausalConv1d": (
        [("x", "T"), ("conv_state_in", "F"), ("weight", "F"), ("bias", "F")],
        [("y", "T"), ("conv_state_out", "F")],
        {"silu": (1, _FLAG)},
    ),
    "DecodeStep": (
        [("xz", "T"), ("conv_state_in", "F"), ("ssm_state_in", "F"), ("conv_weight", "F"), ("conv_bias", "F"),
         ("x_proj_weight", "F"), ("dt_proj_weight", "F"), ("dt_bias", "F"), ("A", "F"), ("D", "F")],
        [("y", "T"), ("conv_state_out", "F"), ("ssm_state_out", "F")],
        {},
    ),
    "RMSNorm": (
        [("x", "R"), ("weight", "T")],
        [("y", "T")],
        {"epsilon": (DEFAULT_EPSILON, "added to the mean square, >= 0")},
    ),
    "AddRMSNorm": (
        [("x", "T"), ("residual", "R"), ("weight", "T")],
        [("y", "T"), ("residual_out", "R")],
        {"epsilon": (DEFAULT_EPSILON, "added to the mean square, >= 0")},
    ),
    "LinearF16W": (
        [("X", "F"), ("W", "H")],
        [("Y", "F")],
        {},
    ),
    "LinearI8W": (
        [("X", "F"), ("W", "I"), ("S", "F")],
        [("Y", "F")],
        {},
    ),
    "DecodeBlock": (
        [("x", "T"), ("residual", "R"), ("norm_weight", "T"), ("in_proj_weight", "T"), ("conv_state_in", "F"),
         ("ssm_state_in", "F"), ("conv_weight", "F"), ("conv_bias", "F"), ("x_proj_weight", "F"),
         ("dt_proj_weight", "F"), ("dt_bias", "F"), ("A", "F"), ("D", "F"), ("out_proj_weight", "T")],
        [("out", "T"), ("residual_out", "R"), ("conv_state_out", "F"), ("ssm_state_out", "F")],
        {"epsilon": (DEFAULT_EPSILON, "added to the mean square, >= 0")},
    ),
    "DecodeHead": (
        [("x", "T"), ("residual", "R"), ("norm_weight", "T"), ("weight", "T")],
        [("logits", "T")],
        {"epsilon": (DEFAULT_EPSILON, "added to the mean square, >= 0")},
    ),
}


def register_schemas() -> None:
    """Register the domain's op schemas with onnx (once per process; later calls do nothing)."""
    for name, (inputs, outputs, attrs) in _SIGNATURES.items():
        if onnx.defs.has(name, DOMAIN):
            continue
        used = sorted({t for _, t in inputs + outputs})
        schema = onnx.defs.OpSchema(
            name, DOMAIN, DOMAIN_VERSION, f"{name} of docs/CONTRACTS.md",
            inputs=[_P(n, t) for n, t in inputs],
            outputs=[_P(n, t) for n, t in outputs],
            type_constraints=[_TYPES[t] for t in used],
            attributes=[
                onnx.defs.OpSchema.Attribute(a, helper.make_attribute(a, v), why) for a, (v, why) in attrs.items()
            ],
        )
        onnx.defs.register_schema(schema)


_op = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)


def _selective_scan(u, delta, A, B, C, D, z, delta_bias, ssm_state):
    y, state = _op.SelectiveScan(u, delta, A, B, C, D, z, delta_bias, ssm_state, delta_softplus=1)
    return y, state


def _causal_conv1d(x, conv_state, weight, bias):
    y, state = _op.CausalConv1d(x, conv_state, weight, bias, silu=1)
    return y, state


def _decode_step(xz, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D):
    y, conv, ssm = _op.DecodeStep(
        xz, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D
    )
    return y, conv, ssm


def _rms_norm(x, weight, eps: float):
    return _op.RMSNorm(x, weight, epsilon=float(eps))


def _add_rms_norm(x, residual, weight, eps: float):
    y, residual_out = _op.AddRMSNorm(x, residual, weight, epsilon=float(eps))
    return y, residual_out


def _linear_f16w(x, weight):
    return _op.LinearF16W(x, weight)


def _linear_i8w(x, weight, scale):
    return _op.LinearI8W(x, weight, scale)


def _decode_block(x, residual, norm_weight, in_proj_weight, conv_state, ssm_state, conv_weight, conv_bias,
                  x_proj_weight, dt_proj_weight, dt_bias, A, D, out_proj_weight, eps: float):
    out, residual_out, conv, ssm = _op.DecodeBlock(
        x, residual, norm_weight, in_proj_weight, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight,
        dt_proj_weight, dt_bias, A, D, out_proj_weight, epsilon=float(eps),
    )
    return out, residual_out, conv, ssm


def _decode_head(x, residual, norm_weight, weight, eps: float):
    return _op.DecodeHead(x, residual, norm_weight, weight, epsilon=float(eps))


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: each torch op becomes one node of the domain."""
    return {
        torch_ops.selective_scan._opoverload: _selective_scan,
        torch_ops.causal_conv1d._opoverload: _causal_conv1d,
        torch_ops.decode_step._opoverload: _decode_step,
        torch_ops.rms_norm._opoverload: _rms_norm,
        torch_ops.add_rms_norm._opoverload: _add_rms_norm,
        torch_ops.linear_f16w._opoverload: _linear_f16w,
        torch_ops.linear_i8w._opoverload: _linear_i8w,
        torch_ops.decode_block._opoverload: _decode_block,
        torch_ops.decode_head._opoverload: _decode_head,
    }


class _FunctionBuilder:
    """Collects the nodes of one FunctionProto; ``op`` returns the names of the new node's outputs."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def op(self, op_type: str, *inputs: str, n_out: int = 1, **attrs) -> str | list[str]:
        outs = [f"_{self.name}_{self._count}_{i}" for i in range(n_out)]
        self._count += 1
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, values: list[int]) -> str:
        """An int64 1-D constant."""
        return self.op("Constant", value=helper.make_tensor("v", TensorProto.INT64, [len(values)], values))

    def float_attr(self, attr: str) -> str:
        """A float32 scalar taken from the function's float attribute ``attr``."""
        node = helper.make_node("Constant", [], [f"_{self.name}_{attr}"])
        node.attribute.append(helper.make_attribute_ref("value_float", AttributeProto.FLOAT, ref_attr_name=attr))
        self.nodes.append(node)
        return node.output[0]

    def flag(self, attr: str) -> str:
        """A boolean scalar taken from the function's int attribute ``attr``."""
        node = helper.make_node("Constant", [], [f"_{self.name}_{attr}"])
        node.attribute.append(helper.make_attribute_ref("value_int", AttributeProto.INT, ref_attr_name=attr))
        self.nodes.append(node)
        return self.op("Cast", node.output[0], to=TensorProto.BOOL)

    def f32(self, x: str) -> str:
        return self.op("Cast", x, to=TensorProto.FLOAT)

    def silu(self, x: str) -> str:
        return self.op("Mul", x, self.op("Sigmoid", x))

    def custom(self, op_type: str, *inputs: str, n_out: int, forward: tuple[str, ...] = ()) -> list[str]:
        """A node of this domain (another op, run through its own function or the library's kernel); its attributes
        ``forward`` take the values of this function's attributes of the same names."""
        outs = self.op(op_type, *inputs, n_out=n_out, domain=DOMAIN)
        for attr in forward:
            self.nodes[-1].attribute.append(helper.make_attribute_ref(attr, AttributeProto.FLOAT, ref_attr_name=attr))
        return outs

    def function(self, outputs: list[str]) -> onnx.FunctionProto:
        """The function of the op named like this builder: its contract inputs, ``outputs`` and attribute defaults."""
        inputs, _, attrs = _SIGNATURES[self.name]
        opsets = [helper.make_opsetid("", OPSET)]
        if any(node.domain == DOMAIN for node in self.nodes):
            opsets.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
        return helper.make_function(
            DOMAIN, self.name, [n for n, _ in inputs], outputs, self.nodes, opsets,
            attribute_protos=[helper.make_attribute(k, v) for k, (v, _) in attrs.items()],
        )


def _scan_body() -> onnx.GraphProto:
    """One step of the recurrence: h (b, e, n), dA (b, e, n), dBu (b, e, n), C (b, n) -> h, y (b, e)."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Mul", ["dA", "h_in"], ["decayed"]),
        helper.make_node("Add", ["decayed", "dBu"], ["h_out"]),
        helper.make_node("Constant", [], ["one"], value=helper.make_tensor("one", TensorProto.INT64, [1], [1])),
        helper.make_node("Unsqueeze", ["c", "one"], ["c_e"]),
        helper.make_node("Mul", ["h_out", "c_e"], ["hc"]),
        helper.make_node("Constant", [], ["last"], value=helper.make_tensor("last", TensorProto.INT64, [1], [2])),
        helper.make_node("ReduceSum", ["hc", "last"], ["y"], keepdims=0),
    ]
    vi = lambda name, rank: helper.make_tensor_value_info(name, f, [None] * rank)  # noqa: E731
    return helper.make_graph(
        nodes, "selective_scan_step", [vi("h_in", 3), vi("dA", 3), vi("dBu", 3), vi("c", 2)],
        [vi("h_out", 3), vi("y", 2)],
    )


def _selective_scan_function() -> onnx.FunctionProto:
    g = _FunctionBuilder("SelectiveScan")
    u, delta, B, C, z = (g.f32(x) for x in ("u", "delta", "B", "C", "z"))
    dt = g.op("Add", delta, "delta_bias")  # (b, l, e)
    dt = g.op("Where", g.flag("delta_softplus"), g.op("Softplus", dt), dt)
    last = g.const([-1])
    dA = g.op("Exp", g.op("Mul", g.op("Unsqueeze", dt, last), "A"))  # (b, l, e, n)
    dBu = g.op("Mul", g.op("Unsqueeze", g.op("Mul", dt, u), last), g.op("Unsqueeze", B, g.const([2])))
    time_major = dict(perm=[1, 0, 2, 3])
    h, ys = g.op(
        "Scan", "ssm_state_in", g.op("Transpose", dA, **time_major), g.op("Transpose", dBu, **time_major),
        g.op("Transpose", C, perm=[1, 0, 2]), n_out=2, num_scan_inputs=3, body=_scan_body(),
    )  # ys (l, b, e)
    y = g.op("Add", g.op("Transpose", ys, perm=[1, 0, 2]), g.op("Mul", u, "D"))
    g.nodes.append(helper.make_node("CastLike", [g.op("Mul", y, g.silu(z)), "u"], ["y"]))
    g.nodes.append(helper.make_node("Identity", [h], ["ssm_state_out"]))
    return g.function(["y", "ssm_state_out"])


def _causal_conv1d_function() -> onnx.FunctionProto:
    g = _FunctionBuilder("CausalConv1d")
    x = g.op("Transpose", g.f32("x"), perm=[0, 2, 1])  # (b, e, l)
    xs = g.op("Concat", "conv_state_in", x, axis=2)  # (b, e, k - 1 + l)
    zero, one = g.const([0]), g.const([1])
    length = g.op("Slice", g.op("Shape", "x"), one, g.const([2]))  # [l]
    width = g.op("Slice", g.op("Shape", "weight"), one, g.const([2]))  # [k]
    starts = g.op("Range", g.op("Squeeze", zero), g.op("Squeeze", length), g.op("Squeeze", one))  # (l,)
    taps = g.op("Range", g.op("Squeeze", zero), g.op("Squeeze", width), g.op("Squeeze", one))  # (k,)
    index = g.op("Add", g.op("Unsqueeze", starts, one), g.op("Unsqueeze", taps, zero))  # (l, k)
    windows = g.op("Gather", xs, index, axis=2)  # (b, e, l, k)
    w = g.op("Unsqueeze", "weight", one)  # (e, 1, k)
    y = g.op("ReduceSum", g.op("Mul", windows, w), g.const([3]), keepdims=0)  # (b, e, l)
    y = g.op("Add", y, g.op("Unsqueeze", "bias", one))
    y = g.op("Where", g.flag("silu"), g.silu(y), y)
    g.nodes.append(helper.make_node("CastLike", [g.op("Transpose", y, perm=[0, 2, 1]), "x"], ["y"]))
    big = g.const([2**62])
    g.nodes.append(helper.make_node("Slice", [xs, length, big, g.const([2])], ["conv_state_out"]))
    return g.function(["y", "conv_state_out"])


def _decode_step_function() -> onnx.FunctionProto:
    g = _FunctionBuilder("DecodeStep")
    one = g.const([1])
    x, z = g.op("Split", g.op("Squeeze", g.f32("xz"), one), axis=1, num_outputs=2, n_out=2)  # (b, e) each
    window = g.op("Concat", "conv_state_in", g.op("Unsqueeze", x, g.const([2])), axis=2)  # (b, e, k)
    xc = g.op("Add", g.op("ReduceSum", g.op("Mul", window, "conv_weight"), g.const([2]), keepdims=0), "conv_bias")
    xc = g.silu(xc)  # (b, e)
    g.nodes.append(helper.make_node("Slice", [window, one, g.const([2**62]), g.const([2])], ["conv_state_out"]))
    x_dbl = g.op("MatMul", xc, g.op("Transpose", "x_proj_weight", perm=[1, 0]))  # (b, r + 2n)
    rank = g.op("Slice", g.op("Shape", "dt_proj_weight"), one, g.const([2]))
    n = g.op("Slice", g.op("Shape", "A"), one, g.const([2]))
    dt, B, C = g.op("Split", x_dbl, g.op("Concat", rank, n, n, axis=0), axis=1, n_out=3)
    dt = g.op("Softplus", g.op("Add", g.op("MatMul", dt, g.op("Transpose", "dt_proj_weight", perm=[1, 0])), "dt_bias"))
    last = g.const([-1])
    decay = g.op("Exp", g.op("Mul", g.op("Unsqueeze", dt, last), "A"))  # (b, e, n)
    dBx = g.op("Mul", g.op("Unsqueeze", g.op("Mul", dt, xc), last), g.op("Unsqueeze", B, one))
    g.nodes.append(helper.make_node("Add", [g.op("Mul", decay, "ssm_state_in"), dBx], ["ssm_state_out"]))
    y = g.op("ReduceSum", g.op("Mul", "ssm_state_out", g.op("Unsqueeze", C, one)), last, keepdims=0)  # (b, e)
    y = g.op("Mul", g.op("Add", y, g.op("Mul", xc, "D")), g.silu(z))
    g.nodes.append(helper.make_node("CastLike", [g.op("Unsqueeze", y, one), "xz"], ["y"]))
    return g.function(["y", "conv_state_out", "ssm_state_out"])


def _normalize(g: _FunctionBuilder, x32: str) -> str:
    """The nodes of RMSNorm on a float32 input: x32 / sqrt(mean(x32^2, last axis) + epsilon) * float32(weight),
    cast to the weight's type into the function output "y"."""
    mean_square = g.op("ReduceMean", g.op("Mul", x32, x32), g.const([-1]), keepdims=1)  # (b, l, 1)
    scale = g.op("Reciprocal", g.op("Sqrt", g.op("Add", mean_square, g.float_attr("epsilon"))))
    y = g.op("Mul", g.op("Mul", x32, scale), g.f32("weight"))
    g.nodes.append(helper.make_node("CastLike", [y, "weight"], ["y"]))
    return "y"


def _rms_norm_function() -> onnx.FunctionProto:
    g = _FunctionBuilder("RMSNorm")
    _normalize(g, g.f32("x"))
    return g.function(["y"])


def _add_rms_norm_function() -> onnx.FunctionProto:
    g = _FunctionBuilder("AddRMSNorm")
    total = g.op("Add", g.f32("residual"), g.f32("x"))
    g.nodes.append(helper.make_node("CastLike", [total, "residual"], ["residual_out"]))
    _normalize(g, g.f32("residual_out"))  # the rounded sum, as the reference model normalises it
    return g.function(["y", "residual_out"])


def _linear_f16w_function() -> onnx.FunctionProto:
    """Y = MatMul(X, Transpose(Cast(W, float))): a stock onnxruntime folds the cast of an initializer at session
    creation, so the function runs a float32 MatMul (float32 weights in memory, the same values)."""
    g = _FunctionBuilder("LinearF16W")
    g.nodes.append(helper.make_node("MatMul", ["X", g.op("Transpose", g.f32("W"), perm=[1, 0])], ["Y"]))
    return g.function(["Y"])


def _linear_i8w_function() -> onnx.FunctionProto:
    """Y = MatMul(X, Transpose(Cast(W, float))) * S: as LinearF16W's function, a float32 MatMul over the int8 values
    (folded at session creation), then each output times its row's scale."""
    g = _FunctionBuilder("LinearI8W")
    product = g.op("MatMul", "X", g.op("Transpose", g.f32("W"), perm=[1, 0]))
    g.nodes.append(helper.make_node("Mul", [product, "S"], ["Y"]))
    return g.function(["Y"])


def _linear(g: _FunctionBuilder, x: str, weight: str) -> str:
    """x (b, 1, K) T times weight (N, K) T transposed, summed in float32 -> float32 (b, 1, N), not rounded yet."""
    return g.op("MatMul", g.f32(x), g.op("Transpose", g.f32(weight), perm=[1, 0]))


def _decode_block_function() -> onnx.FunctionProto:
    """AddRMSNorm -> in_proj -> DecodeStep -> out_proj, the two custom steps as nodes of the domain (inlined in turn by
    onnxruntime where the library is not registered), each product rounded to T."""
    g = _FunctionBuilder("DecodeBlock")
    h, residual_out = g.custom("AddRMSNorm", "x", "residual", "norm_weight", n_out=2, forward=("epsilon",))
    xz = g.op("CastLike", _linear(g, h, "in_proj_weight"), "x")
    step_inputs = [name for name, _ in _SIGNATURES["DecodeStep"][0][1:]]  # the states and parameters: same names
    y, conv, ssm = g.custom("DecodeStep", xz, *step_inputs, n_out=3)
    g.nodes.append(helper.make_node("CastLike", [_linear(g, y, "out_proj_weight"), "x"], ["out"]))
    for name, value in (("residual_out", residual_out), ("conv_state_out", conv), ("ssm_state_out", ssm)):
        g.nodes.append(helper.make_node("Identity", [value], [name]))
    return g.function(["out", "residual_out", "conv_state_out", "ssm_state_out"])


def _decode_head_function() -> onnx.FunctionProto:
    """AddRMSNorm -> LM head: the norm as a node of the domain (as in DecodeBlock's function; its unused residual_out
    is pruned by onnxruntime), the product summed in float32 and rounded to T once."""
    g = _FunctionBuilder("DecodeHead")
    h, _ = g.custom("AddRMSNorm", "x", "residual", "norm_weight", n_out=2, forward=("epsilon",))
    g.nodes.append(helper.make_node("CastLike", [_linear(g, h, "weight"), "x"], ["logits"]))
    return g.function(["logits"])


def model_functions() -> list[onnx.FunctionProto]:
    """Every op as a model-local function of standard ops (opset :data:`OPSET`), for ``model.functions``."""
    return [_selective_scan_function(), _causal_conv1d_function(), _decode_step_function(), _rms_norm_function(),
            _add_rms_norm_function(), _linear_f16w_function(), _linear_i8w_function(), _decode_block_function(),
            _decode_head_function()]
