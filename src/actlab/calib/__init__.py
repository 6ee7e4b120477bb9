"""The calibration set every transform family uses: windows, protocol, cached statistics, generic collectors."""

from actlab.calib.set import MIN_CALIBRATION_TOKENS, CalibrationSet

__all__ = ["MIN_CALIBRATION_TOKENS", "CalibrationSet"]
