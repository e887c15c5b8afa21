"""Freeze the first N stages of a backbone for fine-tuning on a CPU.

Frozen stages keep their pretrained weights (no gradients, so their backward pass
is skipped entirely when they sit at the input side) and every module in them stays
in eval mode even while the rest of the model trains: BatchNorm keeps the pretrained
running statistics (small batches of one kind of image would otherwise overwrite
ImageNet statistics the frozen convolutions were trained against), and dropout or
stochastic depth (EfficientNet's drop-path) does not randomly drop a frozen block,
which would only add noise that no gradient can adapt to.
"""

from typing import List

from torch import nn


def model_stages(model: nn.Module) -> List[List[nn.Module]]:
    """The model's stages, input side first (stem, blocks..., head where it has one)."""
    if hasattr(model, "stages") and callable(model.stages):
        return model.stages()
    if all(hasattr(model, a) for a in ("conv1", "bn1", "layer1", "layer4")):  # torchvision ResNet
        return [[model.conv1, model.bn1]] + [[getattr(model, f"layer{i}")] for i in range(1, 5)]
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):  # SmallNet, VGG: each child is a stage
        return [[m] for m in features]
    raise ValueError(f"--freeze: {type(model).__name__} has no known stage layout (EfficientNet-Lite, ResNet, "
                     "small_max and VGG do)")


def _keep_eval(module: nn.Module, args) -> None:  # type: ignore[no-untyped-def]
    module.training = False


def freeze_stages(model: nn.Module, n: int) -> int:
    """Freeze the first ``n`` stages; returns the number of parameters frozen.

    A forward pre-hook keeps every frozen module (BatchNorm, dropout, a block's drop-path)
    in eval mode whatever ``model.train()`` says, so the training loop needs no special case.
    """
    stages = model_stages(model)
    if not 0 <= n < len(stages):
        raise ValueError(f"--freeze {n}: this model has {len(stages)} stages; expected 0 to {len(stages) - 1} "
                         "(the last stage always trains)")
    frozen = 0
    for stage in stages[:n]:
        for mod in stage:
            for p in mod.parameters():
                if p.requires_grad:
                    p.requires_grad_(False)
                    frozen += p.numel()
            for m in mod.modules():
                m.eval()
                m.register_forward_pre_hook(_keep_eval)
    return frozen
