"""The method registry.  Entries import lazily: `python -m bench list` imports no torch.

Add a method: write methods/<name>.py with a subclass of methods.base.Method,
register it below, and (optionally) add presets in methods/presets/<name>.yaml.
"""

from bench.registry import Registry

METHODS: Registry = Registry("method")
METHODS.register("kmeans", "methods.kmeans:KMeansMethod")
METHODS.register("byol", "methods.byol:BYOLMethod")
METHODS.register("conr", "methods.conr:CoNRMethod")
METHODS.register("scan", "methods.scan:SCANMethod")
METHODS.register("nnm", "methods.nnm:NNMMethod")

BACKBONES: Registry = Registry("backbone")
BACKBONES.register("resnet18_cifar", "methods.nets:resnet18_cifar")
BACKBONES.register("resnet34_cifar", "methods.nets:resnet34_cifar")
BACKBONES.register("resnet18_imagenet", "methods.nets:resnet18_imagenet")
BACKBONES.register("resnet34_imagenet", "methods.nets:resnet34_imagenet")
BACKBONES.register("small_cnn", "methods.nets:small_cnn")

__all__ = ["METHODS", "BACKBONES"]
