"""One index of an ONNX graph that the selection policy and the preparation passes both read:
constants by name, the producer and the consumers of every tensor, and the constant a MatMul
weight is traced back to."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: ops a weight may pass through between its constant and the MatMul that reads it
WEIGHT_PASSTHROUGH = frozenset({"Transpose", "Cast", "Identity", "Reshape"})


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def constants(graph: onnx.GraphProto) -> dict[str, TensorProto]:
    """Outputs of ``Constant`` nodes that hold a tensor, by name."""
    out = {}
    for n in graph.node:
        if n.op_type == "Constant" and n.output:
            value = attr(n, "value")
            if isinstance(value, TensorProto):
                out[n.output[0]] = value
    return out


def reshape_target(node: onnx.NodeProto, dims: list[int], consts: Mapping[str, TensorProto]) -> list[int] | None:
    """The output dims of a Reshape of a constant (ONNX semantics: 0 copies, -1 infers), or None."""
    if len(node.input) < 2 or node.input[1] not in consts:
        return None
    try:
        shape = [int(v) for v in numpy_helper.to_array(consts[node.input[1]]).reshape(-1)]
    except Exception:  # noqa: BLE001 - shape stored as external data we did not load
        return None
    allowzero = attr(node, "allowzero", 0)
    out = [dims[i] if v == 0 and not allowzero and i < len(dims) else v for i, v in enumerate(shape)]
    if out.count(-1) == 1:
        known = int(np.prod([v for v in out if v != -1])) or 1
        out[out.index(-1)] = int(np.prod(dims)) // known
    return out if int(np.prod(out)) == int(np.prod(dims)) else None


def trace_weight(
    name: str, producers: Mapping[str, onnx.NodeProto], consts: Mapping[str, TensorProto]
) -> tuple[str, list[int], list[onnx.NodeProto]] | None:
    """(source tensor name, dims as seen by the consumer, passthrough chain) or None if not constant.

    Follows Transpose/Cast/Identity/Reshape back to an initializer or Constant: the exporters
    write ``Transpose(linear.weight)`` (dynamo, unoptimised) and ``Transpose(Reshape(conv.weight))``
    (a patch embedding as a MatMul).
    """
    chain: list[onnx.NodeProto] = []
    while name not in consts:
        node = producers.get(name)
        if node is None or node.op_type not in WEIGHT_PASSTHROUGH or not node.input:
            return None
        chain.append(node)
        name = node.input[0]
    dims = list(consts[name].dims)
    for node in reversed(chain):  # from the constant towards the consumer
        if node.op_type == "Transpose":
            perm = attr(node, "perm") or list(reversed(range(len(dims))))
            dims = [dims[p] for p in perm]
        elif node.op_type == "Reshape":
            target = reshape_target(node, dims, consts)
            if target is None:
                return None
            dims = target
    return name, dims, chain


@dataclass
class GraphIndex:
    """What the policy and the passes look up, built once per graph (:meth:`build`)."""

    graph: onnx.GraphProto
    consts: dict[str, TensorProto] = field(default_factory=dict)  # initializers and Constant outputs
    inits: dict[str, TensorProto] = field(default_factory=dict)  # initializers only
    producers: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def build(cls, graph: onnx.GraphProto) -> "GraphIndex":
        index = cls(graph)
        index.inits = {t.name: t for t in graph.initializer}
        index.consts = dict(index.inits)
        index.consts.update(constants(graph))
        index.producers = {o: n for n in graph.node for o in n.output if o}
        for n in graph.node:
            for i in n.input:
                if i:
                    index.consumers[i].append(n)
        return index

    def trace_weight(self, name: str) -> tuple[str, list[int], list[onnx.NodeProto]] | None:
        return trace_weight(name, self.producers, self.consts)

    def weight_array(self, source: str, chain: list[onnx.NodeProto]) -> np.ndarray:
        """The traced weight's values as its consumer sees them (the chain applied to the constant)."""
        arr = numpy_helper.to_array(self.consts[source])
        for c in reversed(chain):
            if c.op_type == "Transpose":
                arr = arr.transpose(attr(c, "perm") or None)
            elif c.op_type == "Reshape":
                arr = arr.reshape(reshape_target(c, list(arr.shape), self.consts))
            elif c.op_type == "Cast":
                arr = arr.astype(helper.tensor_dtype_to_np_dtype(attr(c, "to")))
        return arr


def typed_values(model: Any) -> dict[str, int]:
    """Element types of the tensors a (shape-inferred) model declares, by name."""
    types = {t.name: t.data_type for t in model.graph.initializer}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        if vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types
