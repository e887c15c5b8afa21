"""nexedge.export"""

#: Prefix of the ONNX node names (and so TensorRT layer names) of a model's backbone: the exporter
#: names the ``backbone`` submodule's nodes ``/backbone/...`` (export.graph); the INT8 quantizer and
#: the TensorRT engine builder keep everything else (preprocessing, the tail) in float.
BACKBONE_PREFIX = "/backbone/"
