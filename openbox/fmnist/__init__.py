"""The Fashion-MNIST kit: IDX files, the dataset, the model zoo, training, checked
checkpoints, the packaged 1,000-image sample and the demo checkpoint.

It knows torch, not the explanation engine: nothing here imports the rest of openbox,
and the engine never imports this package (a test reads the imports to keep it so).

>>> from openbox import fmnist
>>> ds = fmnist.load_sample()                      # 1,000 test images, offline
>>> model, info = fmnist.load_demo_model()         # the packaged demo CNN
>>> model = fmnist.build_model("cnn", seed=0)      # a fresh reference CNN
>>> boots = fmnist.binary_task(ds, "fmnist-1")      # Ankle boot -> 0 vs Bag -> 1
"""

from openbox.fmnist.checkpoints import (
    CheckpointError,
    CheckpointInfo,
    load_checkpoint,
    printable_text,
    save_checkpoint,
)
from openbox.fmnist.data import (
    BINARY_TASKS,
    CLASSES,
    DATA_DIR_ENV,
    INPUT_SHAPE,
    Dataset,
    binary_subset,
    load_fashion_mnist,
    load_sample,
    select_classes,
)
from openbox.fmnist.demo import DEMO_CLASSES, demo_checkpoint, demo_indices, load_demo_model
from openbox.fmnist.idx import DatasetError, read_idx, write_idx
from openbox.fmnist.models import (
    MAX_PARAMETERS,
    MODEL_NAMES,
    MODELS,
    build_model,
    check_seed,
    count_parameters,
)
from openbox.fmnist.tasks import TASK_NAMES, TASKS, BinaryTask, binary_task, load_task
from openbox.fmnist.training import (
    TrainingDivergedError,
    TrainResult,
    evaluate,
    plnn_ns_layers,
    train,
)

__all__ = [
    "BINARY_TASKS", "CLASSES", "DATA_DIR_ENV", "DEMO_CLASSES", "INPUT_SHAPE", "MAX_PARAMETERS",
    "MODELS", "MODEL_NAMES", "CheckpointError", "CheckpointInfo", "Dataset", "DatasetError",
    "TrainResult", "TrainingDivergedError", "binary_subset", "build_model", "check_seed",
    "count_parameters", "demo_checkpoint", "demo_indices", "evaluate", "load_checkpoint",
    "load_demo_model", "load_fashion_mnist", "load_sample", "printable_text", "read_idx",
    "save_checkpoint", "select_classes", "train", "write_idx",
    # the paper's binary tasks and PLNN-NS training
    "TASKS", "TASK_NAMES", "BinaryTask", "binary_task", "load_task", "plnn_ns_layers",
]
