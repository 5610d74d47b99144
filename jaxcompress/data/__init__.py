"""Data sets (MNIST, Fashion-MNIST, scikit-learn digits) and reproducible minibatching."""
from .batching import epochs as epochs
from .batching import iterate_batches as iterate_batches
from .batching import num_batches as num_batches
from .digits import load_digits as load_digits
from .idx import parse_idx as parse_idx
from .idx import read_idx as read_idx
from .idx import read_idx_content as read_idx_content
from .idx import write_idx as write_idx
from .mnist import DATA_DIR_ENV as DATA_DIR_ENV
from .mnist import MIRRORS as MIRRORS
from .mnist import MNIST_FILES as MNIST_FILES
from .mnist import PIXEL_STATS as PIXEL_STATS
from .mnist import DataNotFoundError as DataNotFoundError
from .mnist import Dataset as Dataset
from .mnist import default_cache_dir as default_cache_dir
from .mnist import load_dataset as load_dataset
from .mnist import load_mnist as load_mnist
