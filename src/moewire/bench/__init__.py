"""Measurement: the routines behind ``moewire bench`` and the data they run on."""
