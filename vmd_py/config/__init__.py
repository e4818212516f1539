"""vm.conf(5) for vmd-py: parse a configuration file into the model in ``model``."""

from .errors import ConfigError, Diagnostic
from .model import Config, DiskConf, NicConf, Owner, SwitchConf, VmConf
from .parser import load, parse_text

__all__ = [
    "Config",
    "ConfigError",
    "Diagnostic",
    "DiskConf",
    "NicConf",
    "Owner",
    "SwitchConf",
    "VmConf",
    "load",
    "parse_text",
]
