"""Training: optimizer and schedule, data for a run, the loop, checkpoints and metrics."""
from .checkpoint import (CheckpointError, checkpoint_to_resume, checkpoints_dir, latest_checkpoint, load_checkpoint,
                         resolve_checkpoint, save_checkpoint)
from .datasets import DataError, RunData, build_datasets
from .distributed import init_parallel
from .optimizer import build_optimizer, learning_rate
from .trainer import NonFiniteError, RunStopped, Trainer, TrainState, Validation
