"""Reference models in Flax Linen."""
from jaxcompress.models.cnn import CNN as CNN
from jaxcompress.models.cnn import CaffeLeNet as CaffeLeNet
from jaxcompress.models.cnn import LeNet5 as LeNet5
from jaxcompress.models.cnn import student_cnn as student_cnn
from jaxcompress.models.cnn import teacher_cnn as teacher_cnn
from jaxcompress.models.mlp import MLP as MLP
from jaxcompress.models.transformer import TransformerLM as TransformerLM
from jaxcompress.models.resnet import ResNet as ResNet
