"""The rewrite passes. Importing this package registers every pass by its textual name."""

from graphslim.passes.conv_group import GroupConv
from graphslim.passes.conv_separable import SeparateConv
from graphslim.passes.conv_substitute import SubstituteConv
from graphslim.passes.equalize import EqualizeLayers
from graphslim.passes.factorize import FactorizeLowRank
from graphslim.passes.fold_bn import FoldBatchNorm
from graphslim.passes.prune_channels import PruneChannels
from graphslim.passes.qdq import InsertQDQ

__all__ = ["EqualizeLayers", "FactorizeLowRank", "FoldBatchNorm", "GroupConv", "InsertQDQ",
           "PruneChannels", "SeparateConv", "SubstituteConv"]
