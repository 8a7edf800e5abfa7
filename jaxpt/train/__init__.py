"""Training: optimizer and schedules, the jitted train step, checkpoints, metrics, the loop."""

from jaxpt.train._checkpoint import Checkpoints as Checkpoints
from jaxpt.train._checkpoint import latest_params as latest_params
from jaxpt.train._checkpoint import trained_checkpoints as trained_checkpoints
from jaxpt.train._loop import Interrupted as Interrupted
from jaxpt.train._loop import NonFiniteError as NonFiniteError
from jaxpt.train._loop import check_batch_fits_mesh as check_batch_fits_mesh
from jaxpt.train._loop import train as train
from jaxpt.train._loop import validate_config as validate_config
from jaxpt.train._loop import validation_data as validation_data
from jaxpt.train._metrics import peak_flops as peak_flops
from jaxpt.train._metrics import read_metrics as read_metrics
from jaxpt.train._optimizer import OPTIMIZERS as OPTIMIZERS
from jaxpt.train._optimizer import SCHEDULES as SCHEDULES
from jaxpt.train._optimizer import decay_mask as decay_mask
from jaxpt.train._optimizer import learning_rate as learning_rate
from jaxpt.train._optimizer import optimizer as optimizer
from jaxpt.train._optimizer import validate_train as validate_train
from jaxpt.train._step import STEP_COMPILER_OPTIONS as STEP_COMPILER_OPTIONS
from jaxpt.train._step import TrainState as TrainState
from jaxpt.train._step import abstract_state as abstract_state
from jaxpt.train._step import init_state as init_state
from jaxpt.train._step import loss_fn as loss_fn
from jaxpt.train._step import make_eval_step as make_eval_step
from jaxpt.train._step import make_train_step as make_train_step
from jaxpt.train._step import start_state as start_state
from jaxpt.train._step import training_key as training_key
