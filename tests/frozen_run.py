"""One frozen node run by itself in tests, layer by layer with its model's own calls, as the graph runs it."""
from lowmem_graph.edge_graph import _run_layer


def run_node(node, input_ids, attention_mask, inject=None, prefix=None, at=None):
    """Final states (after the final norm). `inject(h) -> h` rewrites the stream entering layer `at` (default: the
    node's injection layer); with `prefix` (the stream entering that layer, `prefix_of`) the layers below do not
    run. Each layer is called as the model's loop calls it, so a streamer's groups (checkpointed) take over."""
    at = node.inject_layer if at is None else at
    start = at if prefix is not None else 0
    h, calls = node.layer_calls(input_ids, attention_mask, start=start, prefix=prefix)
    with node._autocast():
        for i, call in enumerate(calls, start):
            if i == at and inject is not None:
                h = inject(h)
            h = _run_layer(call, h)
        return node.norm(h)


def prefix_of(node, input_ids, attention_mask, at=None):
    """The stream entering layer `at` (default: the node's injection layer): what the prefix cache keeps."""
    return node.layer_calls(input_ids, attention_mask, start=node.inject_layer if at is None else at)[0]


def read_of(node, input_ids, attention_mask, layer=None):
    """The states at layer `layer`'s output (default: the node's read layer), through the final norm."""
    layer = node.read_layer if layer is None else layer
    h, calls = node.layer_calls(input_ids, attention_mask, start=layer)
    with node._autocast():
        return node.norm(_run_layer(calls[0], h))
