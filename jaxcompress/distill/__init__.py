"""Distillation losses."""
from jaxcompress.distill.losses import cross_entropy as cross_entropy
from jaxcompress.distill.losses import kd_loss as kd_loss
