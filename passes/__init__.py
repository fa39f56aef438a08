"""The rewrite passes. Importing this package registers every pass by its textual name."""

from passes.conv_group import GroupConv
from passes.conv_substitute import SeparateConv, SubstituteConv
from passes.equalize import EqualizeLayers
from passes.factorize import FactorizeLowRank
from passes.fold_bn import FoldBatchNorm
from passes.prune_channels import PruneChannels
from passes.qdq import InsertQDQ

__all__ = ["EqualizeLayers", "FactorizeLowRank", "FoldBatchNorm", "GroupConv", "InsertQDQ",
           "PruneChannels", "SeparateConv", "SubstituteConv"]
