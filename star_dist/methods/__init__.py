"""Merge methods: pure tensor math behind the contract in `base.py`, listed in `registry.py`."""

from star_dist.methods.base import JointMethod, LowRank, MergeMethod, StreamingMethod, dense
from star_dist.methods.fold import Fold, FoldMethod
from star_dist.methods.iso_c import IsoC, IsoCParams
from star_dist.methods.iso_cts import IsoCts, IsoCtsParams
from star_dist.methods.linear import Average, TaskArithmetic
from star_dist.methods.registry import METHODS, get_method, method_param_names
from star_dist.methods.star import Star, StarParams
from star_dist.methods.ties import Ties, TiesParams
from star_dist.methods.tsv import Tsv, TsvParams

__all__ = [
    "METHODS",
    "Average",
    "Fold",
    "FoldMethod",
    "IsoC",
    "IsoCParams",
    "IsoCts",
    "IsoCtsParams",
    "JointMethod",
    "LowRank",
    "MergeMethod",
    "Star",
    "StarParams",
    "StreamingMethod",
    "TaskArithmetic",
    "Ties",
    "TiesParams",
    "Tsv",
    "TsvParams",
    "dense",
    "get_method",
    "method_param_names",
]
