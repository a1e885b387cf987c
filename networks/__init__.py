"""Networks for the toolkit, behind one registry (see networks/registry.py for the name grammar).

    from networks import get_network, list_networks
    net = get_network("ConvNet-3", channels=3, num_classes=10, resolution=32)
    logits = net(x); feats = net.embed(x); assert torch.allclose(net.classifier(feats), logits)
"""

from networks.registry import (
    EVAL_POOLS,
    canonical_name,
    eval_pool,
    get_network,
    list_networks,
    load_weights,
    parse_name,
)

__all__ = ["EVAL_POOLS", "canonical_name", "eval_pool", "get_network", "list_networks", "load_weights",
           "parse_name"]
