"""Loss/gradient spike monitoring at run time: the online detector (detector.py; its statistics
in stats.py, its trend and growth rules and the start-up advice in rules.py, its events as
sentences in events.py) and the offline replay of a metrics.jsonl (replay.py); the published
baselines and the spike suite that compares them are benchmark code (bench/spikes/). Imports
common and config only.
"""
from harness.config.monitor import MonitorConfig
from harness.monitor.detector import SpikeDetector
from harness.monitor.replay import replay

__all__ = ["MonitorConfig", "SpikeDetector", "replay"]
