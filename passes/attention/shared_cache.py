"""Let one preallocated buffer be a decoder's past and present at once.

GroupQueryAttention appends the new keys/values in place when its present output is bound to
its past input's buffer: no copy of the whole cache per step. That buffer's length is then its
capacity, not the past length, so the graph must not read the past length from the past's
shape. Once every cache input feeds GroupQueryAttention alone (and Shape nodes), each of those
Shape reads gets the past length from the mask instead: ``mask length − new tokens``, which is
what the mask spans (past and new) in every decoder the exporters write. The graph computes the
same values as before for a past of its own length; a generate loop may then share the buffer.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from txcompile.graph.build import GraphBuilder
from txcompile.graph.inputs import PAST_INPUT
from txcompile.graph.nodes import MS_DOMAIN, shape_axes


def past_length_from_mask(model: ir.Model, mask_name: str | None) -> bool:
    """Rewrite the cache inputs' Shape reads (see the module docstring); False, and nothing
    changed, when some cache input has another reader or the mask / input ids are not inputs."""
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    mask, ids = inputs.get(mask_name or ""), inputs.get("input_ids")
    caches = [v for name, v in inputs.items() if PAST_INPUT.fullmatch(name)]
    if mask is None or ids is None or not caches:
        return False
    shape_reads, appends = [], 0
    for cache in caches:
        for use in cache.uses():
            node = use.node
            if node.graph is not graph:  # read inside a subgraph: left as it is
                return False
            if node.op_type == "Shape" and node.domain == "":
                shape_reads.append(node)
            elif node.op_type == "GroupQueryAttention" and node.domain == MS_DOMAIN and use.idx in (3, 4):
                appends += 1
            else:
                return False
    if not appends:
        return False
    order = {id(node): i for i, node in enumerate(graph)}
    shape_reads.sort(key=lambda node: order[id(node)])
    past_length = None
    for node in shape_reads:
        b = GraphBuilder(graph, f"txcompile_shared_cache/{node.name}", node)
        if past_length is None:
            past_length = b.op("Sub", b.op("Shape", mask, start=1, end=2), b.op("Shape", ids, start=1, end=2))
        cache = node.inputs[0]
        dims = b.op("Concat", b.op("Shape", cache, end=2), past_length, b.op("Shape", cache, start=3), axis=0)
        axes = shape_axes(node.attributes.get_int("start"), node.attributes.get_int("end"), 4)
        if axes != range(4):
            start, end = (b.const(np.array([i], np.int64)) for i in (axes.start, axes.stop))
            dims = b.op("Slice", dims, start, end)
        b.commit()
        node.outputs[0].replace_all_uses_with(dims)
    return True
