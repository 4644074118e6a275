"""TopoFlow model: ClimaX backbone with wind scanning and the elevation-barrier attention bias."""

from model.checkpoint import LoadReport, load_pretrained
from model.config import ModelConfig, PhysicsConfig
from model.net import TopoFlowClimaX
from model.presets import PRESETS, Preset, estimate_memory
from model.scan import scan_order_from_wind

__all__ = [
    "LoadReport",
    "ModelConfig",
    "PRESETS",
    "PhysicsConfig",
    "Preset",
    "TopoFlowClimaX",
    "estimate_memory",
    "load_pretrained",
    "scan_order_from_wind",
]
