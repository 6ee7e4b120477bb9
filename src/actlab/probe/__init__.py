"""Hooks at named sites (always removed) and streaming, mergeable statistics."""

from actlab.probe.hooks import Probe, run_with_cache
from actlab.probe.profiler import Profiler, default_statistics
from actlab.probe.sites import Site, all_sites, select_sites

__all__ = ["Probe", "Profiler", "Site", "all_sites", "default_statistics", "run_with_cache", "select_sites"]
