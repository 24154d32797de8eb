"""Weight-only int8 / int4 quantized inference on CPU, applied to a model from outside.

    quantize_model(model, bits=8|4, group_size=128)   swap in QuantLinear / QuantSwiGLUExperts
    save_quantized(model, dir) / load_quantized(dir)  quantized checkpoint directories
    load_model(path, quant="int8"|"int4"|None)        any model path, quantized while loading
    quantize_checkpoint(src, out, bits=)              what ``dsmoe quantize`` runs

Modules: ``kernels`` (formats and CPU kernels), ``matrix`` (QuantMatrix), ``linear``,
``experts``, ``convert`` (module swapping, streaming fill), ``checkpoint`` (files).
"""

from dsmoe.quant.checkpoint import (QuantizedCheckpointWriter, checkpoint_layout,
                                    is_quantized_checkpoint, load_model, load_quantized,
                                    quantize_checkpoint, save_quantized)
from dsmoe.quant.convert import QuantConfig, load_float_tensors, quantize_model
from dsmoe.quant.experts import QuantSwiGLUExperts
from dsmoe.quant.linear import QuantLinear
from dsmoe.quant.matrix import QuantMatrix

__all__ = ["QuantConfig", "QuantLinear", "QuantMatrix", "QuantSwiGLUExperts",
           "QuantizedCheckpointWriter", "checkpoint_layout", "is_quantized_checkpoint",
           "load_float_tensors", "load_model", "load_quantized", "quantize_checkpoint",
           "quantize_model", "save_quantized"]
