"""One ONNX file from two graphs of the same model that differ in how many tokens a call
takes: a decoder's single-token graph and its graph for blocks of ``block`` prompt tokens.

The file runs the single-token graph when ``input_ids`` holds one token per row and the block
graph otherwise, through an ``If`` node; both branches read the same inputs and the same
weights, which are stored once (initializers equal in type, shape and bytes are shared). The
metadata key :data:`BLOCK_KEY` records ``block``, so that a runner knows what the file takes.
"""

from __future__ import annotations

import hashlib
from typing import Any

BLOCK_KEY = "secateur.prefill_block"


def _key(tensor: Any) -> tuple[int, tuple[int, ...], str]:
    """An initializer's identity by content: its type, shape and bytes' hash."""
    from onnx import numpy_helper

    data = numpy_helper.to_array(tensor).tobytes()
    return tensor.data_type, tuple(tensor.dims), hashlib.sha256(data).hexdigest()


def _has_subgraphs(graph: Any) -> bool:
    return any(a.type in (a.GRAPH, a.GRAPHS) for node in graph.node for a in node.attribute)


# ops whose weights ONNX Runtime's quantizer looks up in their own graph only: a branch keeps
# its own copy of those (a convolution's kernel, small beside the projections)
_LOCAL_WEIGHTS = ("Conv", "ConvTranspose")


def _local(graph: Any) -> set[str]:
    """The initializers of ``graph`` that a node of :data:`_LOCAL_WEIGHTS` reads."""
    names = {t.name for t in graph.initializer}
    return {v for n in graph.node if n.op_type in _LOCAL_WEIGHTS for v in n.input if v in names}


def _branch(graph: Any, prefix: str, shared: dict[str, str], inputs: set[str]) -> Any:
    """``graph``'s nodes as a branch without inputs: every value renamed under ``prefix``
    except the outer inputs and the shared initializers (``shared``: old name → outer name),
    each output passed through an ``Identity`` of its own; the initializers not shared stay
    in the branch."""
    import onnx
    from onnx import helper

    def name(value: str) -> str:
        if value == "" or value in inputs:
            return value
        return shared.get(value, prefix + value)

    nodes = []
    for node in graph.node:
        copy = helper.make_node(
            node.op_type,
            [name(v) for v in node.input],
            [name(v) for v in node.output],
            name=prefix + node.name if node.name else "",
            domain=node.domain,
        )
        copy.attribute.extend(node.attribute)
        nodes.append(copy)
    outputs = []
    for out in graph.output:
        passed = f"{prefix}out/{out.name}"
        nodes.append(helper.make_node("Identity", [name(out.name)], [passed]))
        value = helper.make_tensor_value_info(
            passed, out.type.tensor_type.elem_type, _dims(out, out)
        )
        outputs.append(value)
    own = []
    for tensor in graph.initializer:
        if tensor.name not in shared:
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            copy.name = prefix + tensor.name
            own.append(copy)
    return helper.make_graph(nodes, prefix.rstrip("/"), [], outputs, own)


def _dims(a: Any, b: Any) -> list[Any]:
    """The dims of value ``a``, ``new_tokens`` where ``b``'s differ (the graphs differ only in
    how many tokens a call takes)."""
    dims = []
    for x, y in zip(a.type.tensor_type.shape.dim, b.type.tensor_type.shape.dim, strict=True):
        same = x.dim_param == y.dim_param and x.dim_value == y.dim_value
        dims.append((x.dim_param or x.dim_value or None) if same else "new_tokens")
    return dims


def merge_by_length(one: bytes, block: bytes, block_size: int) -> bytes | None:
    """The merged file's bytes, or ``None`` where the graphs cannot be merged (their inputs
    differ in names, their outputs in names, ranks or types, or a node holds a subgraph of its
    own)."""
    import onnx
    from onnx import helper

    first, second = onnx.load_from_string(one), onnx.load_from_string(block)
    g1, g2 = first.graph, second.graph
    outs1, outs2 = list(g1.output), list(g2.output)
    if (
        [o.name for o in outs1] != [o.name for o in outs2]
        or any(
            a.type.tensor_type.elem_type != b.type.tensor_type.elem_type
            or len(a.type.tensor_type.shape.dim) != len(b.type.tensor_type.shape.dim)
            for a, b in zip(outs1, outs2, strict=True)
        )
        or _has_subgraphs(g1)
        or _has_subgraphs(g2)
        or "input_ids" not in {i.name for i in g1.input}
        or {i.name for i in g1.input} != {i.name for i in g2.input}
    ):
        return None
    others = {i.name: i for i in g2.input}
    inputs = {i.name: i for i in g1.input}
    initializers, by_content = [], {}
    shared: list[dict[str, str]] = []
    for prefix, graph in (("one/", g1), ("block/", g2)):
        names = {}
        local = _local(graph)
        for tensor in graph.initializer:
            if tensor.name in local:
                continue
            key = _key(tensor)
            if key not in by_content:
                outer = f"{prefix}{tensor.name}"
                by_content[key] = outer
                copy = onnx.TensorProto()
                copy.CopyFrom(tensor)
                copy.name = outer
                initializers.append(copy)
            names[tensor.name] = by_content[key]
        shared.append(names)
    names_in = set(inputs)
    then_branch = _branch(g1, "one/", shared[0], names_in)
    else_branch = _branch(g2, "block/", shared[1], names_in)
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["merge/shape"]),
        helper.make_node("Constant", [], ["merge/axis"], value=helper.make_tensor("a", 7, [], [1])),
        helper.make_node("Gather", ["merge/shape", "merge/axis"], ["merge/tokens"], axis=0),
        helper.make_node("Constant", [], ["merge/one"], value=helper.make_tensor("o", 7, [], [1])),
        helper.make_node("Equal", ["merge/tokens", "merge/one"], ["merge/single"]),
        helper.make_node(
            "If",
            ["merge/single"],
            [o.name for o in outs1],
            then_branch=then_branch,
            else_branch=else_branch,
        ),
    ]
    outputs = [
        helper.make_tensor_value_info(a.name, a.type.tensor_type.elem_type, _dims(a, b))
        for a, b in zip(outs1, outs2, strict=True)
    ]
    graph_inputs = [
        helper.make_tensor_value_info(
            name, value.type.tensor_type.elem_type, _dims(value, others[name])
        )
        for name, value in inputs.items()
    ]
    merged = helper.make_model(
        helper.make_graph(nodes, g1.name, graph_inputs, outputs, initializers),
        opset_imports=list(first.opset_import),
        producer_name=first.producer_name,
        producer_version=first.producer_version,
    )
    merged.ir_version = first.ir_version
    entry = merged.metadata_props.add()
    entry.key, entry.value = BLOCK_KEY, str(block_size)
    return merged.SerializeToString()
