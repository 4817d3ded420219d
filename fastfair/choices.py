"""The names the command line offers as choices, without importing torch.

``fastfair --help`` and argument errors must not pay for ``import torch``
(seconds, tens of seconds on a loaded machine), so the CLI takes its choice
lists from here. The modules that own the meaning of each name
(``objectives``, ``distill.config``, ``nets``, ``augment``) keep their own
tables; tests/test_cli.py checks that the two agree.
"""
from __future__ import annotations

OBJECTIVES = ("vanilla", "fairdd", "fairdd-mean", "cobra", "fairdd-iw", "fairdd-ldam", "fairdd-groupdro",
              "fairdd-raked")
METHODS = ("dm", "dc", "dsa", "idc", "dream", "cafe")
PRESETS = ("fairdd", "cobra")
BUDGETS = ("paper", "cpu", "cpu-long", "cpu-20min", "cpu-short", "tiny")
TABLES = ("fairdd-cmnist", "fairdd-cfmnist", "fairdd", "cobra-cifar10s", "cobra-cmnist", "intersectional",
          "cdigits-intersectional", "cobra", "cobra-cafe", "cdigits-cafe", "cdigits")
INITS = ("real", "real-balanced", "noise")
BASELINES = ("random", "random-balanced", "whole")
GROUP_SOURCES = ("true", "pseudo")
DC_METRICS = ("ours", "mse", "cos")
NETWORKS = ("ConvNet", "AlexNet", "VGG11", "ResNet18", "ViT")
DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
EXPORT_FORMATS = ("dc",)
