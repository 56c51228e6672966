"""linearize: compile a PyTorch piecewise-linear network into an exact program.

>>> prog = linearize.compile(model, input_shape=(1, 28, 28))
>>> prog(x)            # == model.eval()(x), x: (B, 1, 28, 28)
>>> print(prog)        # one line per node: kind, shapes, non-zeros, source module

The program (:class:`Program`) is a list of :class:`Affine`, :class:`ReLU`,
:class:`MaxPool` and :class:`Add` nodes; see :mod:`linearize.ir`.
"""

from linearize import passes
from linearize.compiler import compile, reject_training_mode  # noqa: A004
from linearize.errors import (
    CompileError,
    LintError,
    NonFiniteParameterError,
    Offender,
    TrainingModeError,
    UnsupportedLayerError,
)
from linearize.ir import (
    GATE_KINDS,
    NODE_KINDS,
    Add,
    Affine,
    Evaluator,
    Interpreter,
    LinearOperator,
    MaxPool,
    Node,
    Program,
    ReLU,
)
from linearize.ops import (
    OPERATOR_FAMILIES,
    AdaptiveAvgPool,
    AvgPool,
    ChannelScale,
    Conv,
    Dense,
    Reshape,
)

__all__ = [
    "GATE_KINDS", "NODE_KINDS", "OPERATOR_FAMILIES",
    "AdaptiveAvgPool", "Add", "Affine", "AvgPool", "ChannelScale", "CompileError", "Conv",
    "Dense", "Evaluator", "Interpreter", "LinearOperator", "LintError", "MaxPool", "Node",
    "NonFiniteParameterError",
    "Offender", "Program", "ReLU", "Reshape", "TrainingModeError", "UnsupportedLayerError",
    "compile", "passes", "reject_training_mode",
]
