"""Import TensorFlow and Keras once, quietly: the converter is the only program allowed to.

TensorFlow prints start-up chatter (oneDNN, CUDA probing) that would drown the one-line errors
the command line promises, so the log level is set before the first import.
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
warnings.filterwarnings("ignore", category=UserWarning, module="keras.*")

import keras
import tensorflow as tf

tf.get_logger().setLevel("ERROR")

__all__ = ["keras", "tf"]
