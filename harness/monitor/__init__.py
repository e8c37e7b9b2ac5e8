"""Loss/gradient spike monitoring: online detector, published baselines, offline replay."""
from harness.monitor.config import MonitorConfig
from harness.monitor.detector import SpikeDetector
from harness.monitor.replay import replay

__all__ = ["MonitorConfig", "SpikeDetector", "replay"]
