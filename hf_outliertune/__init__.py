"""hf-outliertune: OutlierTune W8A8/W6A6 quantization as a Hugging Face transformers quantizer plugin.

Importing the package registers the `hf_outliertune` quant method with transformers.
"""

from .api import quantize
from .config import FORMAT_VERSION, QUANT_METHOD, OutlierTuneConfig
from .export_compressed_tensors import ExportError, export_compressed_tensors
from .modules import OutlierTuneLinear
from .quantizer import OutlierTuneHfQuantizer, register
from . import peft_integration  # noqa: F401  (registers the LoRA layers with PEFT)

register()

__version__ = "0.1.0"
__all__ = [
    "ExportError",
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "OutlierTuneConfig",
    "OutlierTuneHfQuantizer",
    "OutlierTuneLinear",
    "export_compressed_tensors",
    "quantize",
    "register",
]
