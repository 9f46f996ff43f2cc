"""Distillation losses, one per file (each cites its source and documents its shapes).

* :mod:`.feature_imitation`: robust-weighted decoupled foreground/background feature imitation ("local knowledge").
* :mod:`.soft_label`: robust-weighted soft-label KL on positive RoIs / anchors.
* :mod:`.global_relation`: the global-knowledge loss (cosine-similarity vectors against all prototypes).
* :mod:`.pkd`: PKD, Pearson-correlation feature imitation (Cao et al. 2022, as mmrazor's ``PKDLoss``).
"""
from .feature_imitation import decoupled_imitation, weighted_box_mask
from .global_relation import global_relation_loss
from .pkd import pkd_loss
from .soft_label import soft_label_kl

__all__ = ["weighted_box_mask", "decoupled_imitation", "soft_label_kl", "global_relation_loss", "pkd_loss"]
