"""Fine-tuning: data (`data.py`), the loop (`loop.py`), checkpoints (`checkpoint.py`), reports (`report.py`)."""

from .loop import TrainConfig, train

__all__ = ["TrainConfig", "train"]
