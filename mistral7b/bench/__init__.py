"""`mistral7b bench`: speed, memory and bandwidth of our engine against transformers and llama.cpp.

`cli` parses the flags and runs each measurement in its own process (`worker`); `report` turns the
numbers into GB/s, ratios and tables.
"""

from .cli import register

__all__ = ["register"]
