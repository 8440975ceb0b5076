from .compile import compile_blocks
from .mavil import MAViL, PretrainOutput, build_model

__all__ = ["MAViL", "PretrainOutput", "build_model", "compile_blocks"]
