"""Train and eval steps over a compressed view, with optional teacher and data parallelism."""
from jaxcompress.train.state import TrainState as TrainState
from jaxcompress.train.state import init_train_state as init_train_state
from jaxcompress.train.state import linen_apply_fn as linen_apply_fn
from jaxcompress.train.state import split_variables as split_variables
from jaxcompress.train.step import Teacher as Teacher
from jaxcompress.train.step import evaluate as evaluate
from jaxcompress.train.step import make_eval_step as make_eval_step
from jaxcompress.train.step import make_train_step as make_train_step
