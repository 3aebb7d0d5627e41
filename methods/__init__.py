"""FaceBench methods: one module per paper, each a drop-in ``nn.Module`` that imports only torch.

Importing this package registers every method in :data:`methods.base.METHODS`.
"""

from methods.base import METHODS, BatchSpec, LossOutput, Method, build_method  # noqa: F401
from methods import arcface, mv_softmax, npcface, partial_fc  # noqa: F401  (register the heads)
from methods import dcq  # noqa: F401  (registers dcq)
from methods import sst  # noqa: F401  (registers sst)
from methods import masst  # noqa: F401  (registers masst)
from methods import prototype_memory  # noqa: F401  (registers prototype_memory, alias pm)
