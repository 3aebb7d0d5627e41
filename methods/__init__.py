"""FaceBench methods: one module per paper, each a drop-in ``nn.Module`` that imports only torch.

Importing this package registers every method in :data:`methods.base.METHODS`.
"""

from methods.base import METHODS, BatchSpec, LossOutput, Method, build_method  # noqa: F401
from methods import arcface, mv_softmax, npcface, partial_fc  # noqa: F401  (register the heads)
