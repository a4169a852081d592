"""Weight initialisation shared by the model zoo.

Every architecture here is ReLU-based, so convolutions get He (Kaiming) normal initialisation in
``fan_out`` mode, as in He et al. 2015 and torchvision's ResNets; BatchNorm starts as the identity.
Keeping it in one place means a retrained baseline and a pruned-then-retrained model start from the
same distribution whichever zoo entry they came from.
"""

from __future__ import annotations

from torch import nn

__all__ = ["init_weights"]


def init_weights(model: nn.Module) -> None:
    """Initialise ``model``'s conv, BatchNorm and linear layers in place.

    Linear layers keep a Kaiming normal weight (``fan_in``, the classifier sees post-ReLU features) and a
    zero bias, so the initial logits are centred.

    Args:
        model: The network to initialise; all submodules are visited.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
