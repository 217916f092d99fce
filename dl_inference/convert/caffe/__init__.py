"""Caffe -> ONNX conversion.

:mod:`.loader` reads a deploy ``.prototxt`` (V2 ``layer`` or legacy V1 ``layers``) and its
``.caffemodel`` weights into a :class:`~.loader.CaffeNet`, the input of the layer converter.
"""

from dl_inference.convert.caffe.loader import (
    CaffeLayer,
    CaffeNet,
    load_net,
    read_caffemodel,
    read_prototxt,
)

__all__ = ["CaffeLayer", "CaffeNet", "load_net", "read_caffemodel", "read_prototxt"]
