"""Checkpoints: sharded save/load with torch.distributed.checkpoint (DCP), exact resume, integrity.

- layout.py: the folder, its COMPLETE marker with a SHA-256 of every file, validation, discovery;
- checkpointer.py: atomic saves, clean failures (disk full), loading with fall-back (IO only:
  it is handed a stateful object, engine/trainer.TrainState);
- resume.py: which config fields a resumed run may change and which it may not;
- safe_io.py: nothing in a checkpoint is unpickled except DCP's own metadata classes;
- stateful.py: the model and the optimizer as DCP Stateful objects.

The run directory's lock and relaunch rules: engine/run_dir.py. Stop signals and
fault-injection hooks: engine/faults.py.
"""

from engine.checkpoint.checkpointer import Checkpointable, Checkpointer, CheckpointWriteError
from engine.checkpoint.layout import (CKPT_SUBDIR, MARKER, STATE_FILE, SUPERSEDED_SUBDIR, checkpoint_root,
                                      latest_valid, list_checkpoints, resolve_checkpoint, step_dir,
                                      validate_checkpoint)
from engine.checkpoint.resume import (FIXED_ON_RESUME, MAY_CHANGE_ON_RESUME, ResumeMismatchError,
                                      check_resumable)
from engine.checkpoint.safe_io import (CheckpointError, SafeFileSystemReader, SafeLoadPlanner,
                                       UnsafeCheckpointError, read_metadata_safely)

__all__ = ["CKPT_SUBDIR", "FIXED_ON_RESUME", "MARKER", "MAY_CHANGE_ON_RESUME", "STATE_FILE", "SUPERSEDED_SUBDIR",
           "CheckpointError", "CheckpointWriteError", "Checkpointable", "Checkpointer", "ResumeMismatchError",
           "SafeFileSystemReader", "SafeLoadPlanner", "UnsafeCheckpointError", "check_resumable",
           "checkpoint_root", "latest_valid", "list_checkpoints", "read_metadata_safely", "resolve_checkpoint",
           "step_dir", "validate_checkpoint"]
