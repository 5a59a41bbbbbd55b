from torch import nn

from vtfuse.registry import Registry

FUSIONS: Registry[nn.Module] = Registry("fusion strategy")
