"""torch.hub entry points for backbones trained by this service (nothing is downloaded: weights are a path or URL).

    model = torch.hub.load(REPO_DIR, "resnet50", source="local", weights="s3://bucket/runs/bt/resnet50.pth")
    model = torch.hub.load(REPO_DIR, "resnet18", source="local", weights="runs/digits-linear/classifier.pth")

`weights` is what `barlow train` exports (`<backbone>.pth`: the backbone, no fc), what `barlow export` writes
(`model.safetensors` or `<backbone>.pth` in its folder) or what `barlow evaluate` writes (`classifier.pth`: the
backbone with its trained linear head). With a head the model classifies, its fc sized from
the file; without one, fc is the identity and the model returns features, instead of the random fc the reference's
hub model returns (its issue #54). The stem (ImageNet's or CIFAR's) is read off the weights. Any fsspec URL works:
local paths, s3:// (credentials from the AWS chain), gs://, http(s)://.
"""

dependencies = ["torch", "torchvision", "fsspec", "safetensors"]


def _resnet(arch: str, pretrained: bool, weights: str | None, **kwargs):
    import fsspec
    import torch
    import torchvision

    if pretrained and weights is None:
        raise ValueError("no weights are published with this repository: pass weights=PATH_OR_URL of a "
                         ".safetensors or .pth file exported by barlow export, barlow train or barlow evaluate "
                         "(or pretrained=False)")
    model = getattr(torchvision.models, arch)(**kwargs)
    if not pretrained:
        return model
    with fsspec.open(weights, "rb") as file:
        if weights.endswith(".safetensors"):  # tensors only, as weights_only below
            import safetensors.torch

            state = safetensors.torch.load(file.read())
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    if state["conv1.weight"].shape[-1] == 3:  # the CIFAR stem: 3x3 stride-1 convolution, no max-pool
        model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = torch.nn.Identity()
    if "fc.weight" in state:
        model.fc = torch.nn.Linear(state["fc.weight"].shape[1], state["fc.weight"].shape[0])
    else:
        model.fc = torch.nn.Identity()
    model.load_state_dict(state)
    return model


def resnet50(pretrained: bool = True, weights: str | None = None, **kwargs):
    """ResNet-50 with Barlow Twins weights (the reference's model): features, or classes with a trained head."""
    return _resnet("resnet50", pretrained, weights, **kwargs)


def resnet34(pretrained: bool = True, weights: str | None = None, **kwargs):
    """ResNet-34 with weights exported by this service."""
    return _resnet("resnet34", pretrained, weights, **kwargs)


def resnet18(pretrained: bool = True, weights: str | None = None, **kwargs):
    """ResNet-18 with weights exported by this service (e.g. the digits or CIFAR-10 specs)."""
    return _resnet("resnet18", pretrained, weights, **kwargs)
