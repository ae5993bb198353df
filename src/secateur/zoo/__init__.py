"""Reference networks of the pruning literature, for 28x28 grayscale and 32x32 RGB images.

Build one by name with :func:`create_model`; :func:`list_models` names them all. Two families
are built by prefix: ``torchvision.<arch>`` and ``hf.<model_type>`` (transformers, random
weights, never downloaded).
"""

from __future__ import annotations

from ._hf import from_transformers as from_transformers
from ._lenet import LeNet5 as LeNet5
from ._lenet import LeNet300100 as LeNet300100
from ._lenet import lenet5 as lenet5
from ._lenet import lenet_300_100 as lenet_300_100
from ._registry import create_model as create_model
from ._registry import list_models as list_models
from ._registry import register_model as register_model
from ._resnet import BasicBlock as BasicBlock
from ._resnet import ResNet as ResNet
from ._resnet import resnet20 as resnet20
from ._resnet import resnet32 as resnet32
from ._resnet import resnet44 as resnet44
from ._resnet import resnet56 as resnet56
from ._vgg import VGG as VGG
from ._vgg import vgg11_bn as vgg11_bn
from ._vgg import vgg16_bn as vgg16_bn
